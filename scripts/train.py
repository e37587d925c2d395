#!/usr/bin/env python
"""Trains a model from gin files (T5X-style flags). See topk_transformers/cli.py."""

from topk_transformers import cli

if __name__ == "__main__":
  cli.train_main()
