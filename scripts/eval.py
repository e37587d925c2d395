#!/usr/bin/env python
"""Evaluates a checkpoint (loss, accuracy, per-layer activation sparsity, evaluators): topk-eval. See topk_transformers/commands/eval.py."""

import sys

from topk_transformers.commands import eval

if __name__ == "__main__":
  sys.exit(eval.main())
