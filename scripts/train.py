#!/usr/bin/env python
"""Trains a model from gin files (T5X-style flags): topk-train. See topk_transformers/commands/train.py."""

import sys

from topk_transformers.commands import train

if __name__ == "__main__":
  sys.exit(train.main())
