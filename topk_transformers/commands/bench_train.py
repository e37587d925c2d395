"""``topk-bench-train``: the training step of T5 v1.0, T5 v1.1 and ViT, dense against Top-k, on random data.

  topk-bench-train --models=t5_1.0 --sizes=base --k=128 --methods=exact,threshold --num_layers=2 --reps=5 \
      --json=benchmarks/train_t5_1.0_base.json --markdown=benchmarks/train_t5_1.0_base.md

Needs only jax, flax and optax (``benchmarks/training.py`` says what it measures).
"""

from __future__ import annotations

from topk_transformers.commands import common


@common.command(tensorflow=False)
def main(argv) -> int:
  from topk_transformers.benchmarks import training  # pylint: disable=g-import-not-at-top

  p = common.ArgumentParser(prog="topk-bench-train", description=__doc__.splitlines()[0])
  p.add_argument("--models", default=",".join(training.MODELS), help="comma list of t5_1.0,t5_1.1,vit")
  p.add_argument("--sizes", default="small,base,large", help="comma list of tiny,small,base,large")
  p.add_argument("--k", default="64,128,256", help="comma list of k")
  p.add_argument("--methods", default="exact,approx,threshold", help="comma list of Top-k selection methods")
  p.add_argument("--num_layers", type=int, default=2, help="layers in each stack (0: the published depth)")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--input_length", type=int, default=128, help="T5 encoder tokens per example")
  p.add_argument("--target_length", type=int, default=32, help="T5 decoder tokens per example")
  p.add_argument("--image_size", type=int, default=224, help="ViT image side (16x16 patches)")
  p.add_argument("--vocab_size", type=int, default=None, help="T5 embedding rows (default: the published 32128)")
  p.add_argument("--dtype", default="float32", help="float32 or bfloat16 activations")
  p.add_argument("--reps", type=int, default=5, help="timed steps per variant (median reported)")
  p.add_argument("--no_selection", action="store_true", help="skip the selection microbenchmark on one MLP")
  p.add_argument("--selection_reps", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write results here")
  p.add_argument("--markdown", default=None, help="write the tables here")
  args = p.parse_args(argv)
  items = common.comma_list
  settings = training.Settings(
      models=items(args.models), sizes=items(args.sizes), ks=items(args.k, int), methods=items(args.methods),
      num_layers=args.num_layers or None, batch_size=args.batch_size, input_length=args.input_length,
      target_length=args.target_length, image_size=args.image_size, vocab_size=args.vocab_size, dtype=args.dtype,
      reps=args.reps,
      selection=not args.no_selection, selection_reps=args.selection_reps, seed=args.seed)
  result = training.run(settings, command=" ".join(["topk-bench-train", *argv]))
  common.write_json(args.json, result)
  training.write_markdown(args.markdown, result)
  for path in (args.json, args.markdown):
    if path:
      print(f"wrote {path}")
  return 0
