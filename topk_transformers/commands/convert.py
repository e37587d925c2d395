"""``topk-convert``: converts T5 checkpoints between Hugging Face, T5X and this project's format.

  topk-convert --from=hf --to=project --input=/models/t5-base --output=/tmp/t5_base
  topk-convert --from=project --to=hf --input=/tmp/topk_t5_smoke --output=/tmp/smoke_hf
  topk-convert --from=t5x --to=project --input=gs://.../t5_1_1_base/checkpoint_1000000 --output=/tmp/t5_1_1_base

``--from=auto`` (the default) tells the format from the files. A T5X checkpoint
carries no config: it is inferred from the shapes, or taken from
``--gin_file``/``--gin.`` flags (the model's ``network.T5Config``), against
which any input is also checked. A ``spiece.model`` next to the input goes
with the output (``--vocabulary`` names another). ``--to=t5x`` writes T5X's
msgpack + zarr layout, parameters only.

``--output`` must be a new or empty directory: one that holds anything (a run,
a previous conversion) is refused and left as it is, unless ``--overwrite``,
which replaces only what a conversion writes there.
"""

from __future__ import annotations

from topk_transformers.commands import common


@common.command
def main(argv) -> int:
  from topk_transformers.t5 import convert  # pylint: disable=g-import-not-at-top

  gin_files, bindings, rest = common.gin_flags(argv, required=False)
  parser = common.ArgumentParser(prog="topk-convert", description=__doc__.splitlines()[0])
  parser.add_argument("--from", dest="src", default="auto", choices=("auto",) + convert.FORMATS)
  parser.add_argument("--to", dest="dst", required=True, choices=("hf", "t5x", "project"))
  parser.add_argument("--input", required=True, help="the checkpoint directory to read")
  parser.add_argument("--output", required=True, help="the directory to write")
  parser.add_argument("--vocabulary", default=None, help="a SentencePiece model to copy as spiece.model")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into a non-empty --output, replacing what a conversion writes there")
  args = parser.parse_args(rest)
  convert.check_output(args.output, args.overwrite)  # before anything is read, so a refusal is immediate
  config = None
  if gin_files or bindings:
    from topk_transformers import gin_utils  # pylint: disable=g-import-not-at-top

    gin_utils.configure(gin_files, bindings)
    config = gin_utils.get_macro("MODEL").module.config
  config, params = convert.load(args.input, args.src, config)
  vocabulary = args.vocabulary or convert.find_vocabulary(args.input)
  convert.save(config, params, args.output, args.dst, vocabulary, overwrite=args.overwrite)
  n = sum(int(v.size) for v in convert.flatten(params).values())
  print(f"wrote {args.dst} checkpoint {args.output}: {n:,} parameters, "
        f"{'v1.1 gated ' if len(config.mlp_activations) > 1 else 'v1.0 '}{config.mlp_activations[0]}, "
        f"emb {config.emb_dim}, mlp {config.mlp_dim}, {config.num_encoder_layers}+{config.num_decoder_layers} layers"
        + (f", vocabulary {vocabulary}" if vocabulary else ""))
  return 0
