#!/usr/bin/env python
"""Decodes text with a trained T5 checkpoint: topk-decode. See topk_transformers/commands/decode.py."""

import sys

from topk_transformers.commands import decode

if __name__ == "__main__":
  sys.exit(decode.main())
