"""``topk-bench-decode``: unbatched greedy decoding of T5, dense against Top-k sparse, on the same random weights.

  topk-bench-decode --sizes=large --version=1.0 --k=128 --method=exact --dtype=float32 --steps=16 --reps=11 \
      --json=benchmarks/decode_k128_v1.0_large.json [--plot=benchmarks/decode.png]
  topk-bench-decode --sizes=large --predicted --predictor_rank=32 --candidates=256,512 ...

Needs only jax and flax (``benchmarks/decoding.py`` says what it measures and counts).
"""

from __future__ import annotations


from topk_transformers.commands import common


@common.command(tensorflow=False)
def main(argv) -> int:
  from topk_transformers.benchmarks import decoding  # pylint: disable=g-import-not-at-top

  p = common.ArgumentParser(prog="topk-bench-decode", description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="large", help="comma list of tiny,small,base,large,3B,11B")
  p.add_argument("--version", default="1.0", help="1.0 or 1.1")
  p.add_argument("--k", default="128", help="comma list of k")
  p.add_argument("--method", default="exact", help="comma list of Top-k selection methods")
  p.add_argument("--dtype", default="float32", help="comma list of float32,bfloat16")
  p.add_argument("--num_layers", type=int, default=None, help="encoder and decoder layers (default: published)")
  p.add_argument("--encoder_layers", type=int, default=None,
                 help="encoder layers only (default: as the decoder); the encoder runs once, untimed")
  p.add_argument("--steps", type=int, default=16, help="tokens decoded per timed run")
  p.add_argument("--reps", type=int, default=5, help="timed runs per variant (median reported)")
  p.add_argument("--input_length", type=int, default=32, help="encoder input tokens")
  p.add_argument("--dense_topk", action="store_true", help="also time the Top-k model on the dense path")
  p.add_argument("--predicted", action="store_true",
                 help="also time the predicted-neuron path (random predictors: the cost does not depend on them)")
  p.add_argument("--predictor_rank", default=str(decoding.DEFAULT_RANK), help="comma list of predictor ranks r")
  p.add_argument("--xla_gather", action="store_true",
                 help="also time the sparse and predicted paths with XLA's gather in place of the CPU row kernels")
  p.add_argument("--candidates", default=str(decoding.DEFAULT_CANDIDATES),
                 help="comma list of candidate counts c per MLP step (c >= k)")
  p.add_argument("--no_in_out", dest="in_out", action="store_false",
                 help="skip dense decoding with T5X's [in, out] kernels (timed by default, beside the [out, in] layout)")
  p.add_argument("--vecmat_gib", type=float, default=1.0,
                 help="GiB of the float32 matrix whose vector products measure the machine's rate, interleaved (0: off)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write results here")
  p.add_argument("--plot", default=None, help="write a PNG of latency and speedup against k here")
  args = p.parse_args(argv)
  items = common.comma_list
  settings = decoding.Settings(
      sizes=items(args.sizes), version=args.version, ks=items(args.k, int), methods=items(args.method),
      dtypes=items(args.dtype), num_layers=args.num_layers, encoder_layers=args.encoder_layers, steps=args.steps,
      reps=args.reps, input_length=args.input_length, dense_topk=args.dense_topk, predicted=args.predicted,
      predictor_ranks=items(args.predictor_rank, int), candidates=items(args.candidates, int), xla_gather=args.xla_gather,
      in_out=args.in_out, vecmat_gib=args.vecmat_gib, seed=args.seed)
  result = decoding.run(settings, command=" ".join(["topk-bench-decode", *argv]))
  common.write_json(args.json, result)
  if args.json:
    print(f"wrote {args.json}")
  if args.plot:
    from topk_transformers import plotting  # pylint: disable=g-import-not-at-top

    plotting.plot_decode_speedups(result["results"], args.plot)
    print(f"wrote {args.plot}")
  return 0
