#!/usr/bin/env python
"""Activation sparsity of a checkpoint: per-layer % nonzero, per-neuron firing, % over training.

  python scripts/sparsity_report.py --gin_file=configs/t5/runs/cpu_smoke.gin --checkpoint=/tmp/topk_t5_smoke \
      [--split=train,validation] [--eval_steps=20] [--run_dir=DIR] [--over_steps=events|checkpoints] --out=/tmp/report

``--checkpoint=init`` measures the parameters training starts from. Writes report.json,
per_layer.png, firing_*.png and (given a run directory) over_steps.png; prints a table.
See topk_transformers/sparsity_report.py.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from topk_transformers import gin_utils, sparsity_report  # noqa: E402

if __name__ == "__main__":
  gin_utils.exit_on_config_error(sparsity_report.main)(sys.argv[1:])
