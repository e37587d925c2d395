#!/usr/bin/env python
"""Parameter count, shapes and MLP FLOPs of a gin-configured model: topk-model-info. See topk_transformers/commands/model_info.py."""

import sys

from topk_transformers.commands import model_info

if __name__ == "__main__":
  sys.exit(model_info.main())
