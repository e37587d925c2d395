#!/usr/bin/env python
"""Assembles the paper's Table 1 from run directories' ``eval_results.json``.

    python scripts/robustness_table.py runs/digits/*/ --markdown table.md --json table.json

Columns are the runs' ``name``s (runs sharing a name are seeds: mean ± sample std);
rows are natural accuracy, accuracy after training with each label-noise level,
accuracy under each corruption (mean over severities), and ECE. The Markdown is
printed; ``--markdown`` / ``--json`` also write it and the structured table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from topk_transformers import robustness  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run_dirs", nargs="+", help="run directories (or eval_results.json files)")
  parser.add_argument("--markdown", help="write the Markdown table here")
  parser.add_argument("--json", help="write the table as JSON here")
  args = parser.parse_args(argv)

  runs = [robustness.load_results(path) for path in args.run_dirs]
  table = robustness.build_table(runs)
  table["run_dirs"] = list(args.run_dirs)
  markdown = robustness.table_markdown(table)
  sys.stdout.write(markdown)
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(markdown)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(table, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
