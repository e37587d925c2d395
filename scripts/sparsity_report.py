#!/usr/bin/env python
"""Activation sparsity of a checkpoint (report.json + PNGs): topk-sparsity. See topk_transformers/commands/sparsity.py."""

import sys

from topk_transformers.commands import sparsity

if __name__ == "__main__":
  sys.exit(sparsity.main())
