#!/usr/bin/env python
"""The paper's Table 1 from runs' eval_results.json: topk-robustness-table. See topk_transformers/commands/robustness_table.py."""

import sys

from topk_transformers.commands import robustness_table

if __name__ == "__main__":
  sys.exit(robustness_table.main())
