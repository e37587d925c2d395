"""``topk-model-info``: parameter count, per-module shapes and MLP FLOPs per token of a gin-configured model.

  topk-model-info --gin_file=t5/t5_1_0/11B.gin [--gin.TOP_K=128] [--top_k=128] [--json info.json]

Shapes come from ``jax.eval_shape``, so the 11B model answers as fast as the tiny one.
"""

from __future__ import annotations

from topk_transformers.commands import common


@common.command
def main(argv) -> int:
  from topk_transformers import gin_utils, model_info  # pylint: disable=g-import-not-at-top

  gin_files, bindings, rest = common.gin_flags(argv)
  parser = common.ArgumentParser(prog="topk-model-info", description=__doc__.splitlines()[0])
  parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
  parser.add_argument("--top_k", type=int, default=None,
                      help=f"k for the FLOPs comparison (default: the config's, else {model_info.DEFAULT_REPORT_K})")
  args = parser.parse_args(rest)
  gin_utils.configure(gin_files, bindings)
  info = model_info.model_info(gin_utils.get_macro("MODEL"), args.top_k)
  info.update(gin_files=list(gin_files), gin_bindings=list(bindings))
  print(model_info.format_report(info))
  if args.json:
    common.write_json(args.json, info)
    print(f"wrote {args.json}")
  return 0
