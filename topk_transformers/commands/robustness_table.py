"""``topk-robustness-table``: the paper's Table 1 from run directories' ``eval_results.json``.

  topk-robustness-table runs/digits/*/ --markdown table.md --json table.json

Columns are the runs' ``name``s (runs sharing a name are seeds: mean ± sample std);
rows are natural accuracy, accuracy after training with each label-noise level,
accuracy under each corruption (mean over severities), and ECE. The Markdown is
printed; ``--markdown`` / ``--json`` also write it and the structured table.
"""

from __future__ import annotations

import sys

from topk_transformers.commands import common


@common.command(tensorflow=False)
def main(argv) -> int:
  from topk_transformers import robustness  # pylint: disable=g-import-not-at-top

  parser = common.ArgumentParser(prog="topk-robustness-table", description=__doc__.splitlines()[0])
  parser.add_argument("run_dirs", nargs="+", help="run directories (or eval_results.json files)")
  parser.add_argument("--markdown", help="write the Markdown table here")
  parser.add_argument("--json", help="write the table as JSON here")
  args = parser.parse_args(argv)
  table = robustness.build_table([robustness.load_results(path) for path in args.run_dirs])
  table["run_dirs"] = list(args.run_dirs)
  markdown = robustness.table_markdown(table)
  sys.stdout.write(markdown)
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(markdown)
  common.write_json(args.json, table)
  return 0
