#!/usr/bin/env python
"""Evaluates a checkpoint (loss, accuracy, per-layer activation sparsity). See topk_transformers/evaluate.py."""

import sys

from topk_transformers import cli

if __name__ == "__main__":
  cli.eval_main(sys.argv[1:])
