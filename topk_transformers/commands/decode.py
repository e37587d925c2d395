"""``topk-decode``: decodes text with a trained T5 checkpoint (greedy, beam search or sampling).

  topk-decode --gin_file=t5/runs/cpu_smoke.gin --checkpoint=/tmp/topk_t5_smoke \
      --input "The cat <extra_id_0> on the mat." [--input "..."] [--method=beam --num_decodes=4 --alpha=0.6]

``--gin_file`` / ``--gin.NAME=VALUE`` are the run's own gin flags (the model and
its vocabulary come from ``MODEL``). ``--checkpoint`` is a run directory (its
newest step) or ``RUN_DIR/checkpoints/<step>``; only the params are read.
Top-k models decode on the sparse path automatically at batch 1;
``--gin.network.T5Config.sparse_decode=False`` forces the dense path.
``--predictors=RUN/predictors/r32.npz --candidates=256`` decodes on the predicted-neuron
path (``topk-train-predictors`` writes them; ``--candidates`` sets
``network.T5Config.decode_candidates``, which gin may also set).

An input longer than the model's input length (``--input_length``; default the
gin's ``TASK_FEATURE_LENGTHS['inputs']``, else 512) is cut to it, as T5X's
feature lengths do, with one warning line saying how many tokens were dropped.
"""

from __future__ import annotations

from typing import Sequence

from topk_transformers.commands import common

DEFAULT_INPUT_LENGTH = 512  # T5's pretraining inputs length, for gin files that set no TASK_FEATURE_LENGTHS


def check_settings(args) -> None:
  """The decoding numbers make sense: a ``ConfigError`` naming the flag otherwise, before anything is built."""
  wrong = [(args.num_decodes < 1, f"--num_decodes={args.num_decodes}: it must be at least 1"),
           (args.max_decode_length < 1, f"--max_decode_length={args.max_decode_length}: it must be at least 1"),
           (not args.temperature >= 0, f"--temperature={args.temperature}: it must be >= 0 (0 is greedy)"),
           (args.topk < 0, f"--topk={args.topk}: it must be >= 0 (0: all tokens)"),
           (not 0 <= args.topp <= 1, f"--topp={args.topp}: it must lie in [0, 1] (0: off)"),
           (args.input_length is not None and args.input_length < 1,
            f"--input_length={args.input_length}: it must be at least 1"),
           (args.candidates is not None and args.candidates < 1,
            f"--candidates={args.candidates}: it must be at least 1")]
  for bad, message in wrong:
    if bad:
      raise common.ConfigError(message)


def check_utf8(texts: Sequence[str]) -> None:
  """Each ``--input`` is UTF-8: the bytes of another encoding reach Python as lone surrogates (``surrogateescape``)."""
  for n, text in enumerate(texts):
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      offset = len(text[:e.start].encode("utf-8", "surrogateescape"))
      char = text[e.start]
      what = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"character {char!r}"
      raise common.ConfigError(f"--input number {n + 1} is not UTF-8 text: {what} at byte offset {offset}; "
                               "convert it to UTF-8") from None


def input_length(gin_utils) -> int:
  """The model's input length: the gin's ``TASK_FEATURE_LENGTHS['inputs']`` if it sets one, else 512."""
  lengths = gin_utils.get_macro("TASK_FEATURE_LENGTHS", default=None, evaluate=False)
  try:
    length = lengths["inputs"]
  except (TypeError, KeyError, IndexError):
    return DEFAULT_INPUT_LENGTH
  if not isinstance(length, int) or length < 1:
    raise common.ConfigError(f"TASK_FEATURE_LENGTHS['inputs'] = {length!r}: it must be a positive integer")
  return length


@common.command
def main(argv) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from topk_transformers import decoding, gin_utils, runs  # pylint: disable=g-import-not-at-top
  from topk_transformers.t5 import text  # pylint: disable=g-import-not-at-top

  gin_files, bindings, rest = common.gin_flags(argv)
  p = common.ArgumentParser(prog="topk-decode", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="run directory or RUN_DIR/checkpoints/<step>")
  p.add_argument("--input", action="append", default=[], help="text to decode (repeatable)")
  p.add_argument("--input_file", default=None, help="more inputs, one per line")
  p.add_argument("--method", default="greedy", choices=decoding.METHODS)
  p.add_argument("--num_decodes", type=int, default=1, help="beams, or samples per input")
  p.add_argument("--alpha", type=float, default=0.6, help="beam search length penalty")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--topk", type=int, default=0, help="sample among the topk most likely tokens (0: all)")
  p.add_argument("--topp", type=float, default=0.0, help="nucleus sampling mass (0: off)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_decode_length", type=int, default=64)
  p.add_argument("--input_length", type=int, default=None,
                 help="encoder tokens per input; longer inputs are cut (default: TASK_FEATURE_LENGTHS['inputs'], "
                      f"else {DEFAULT_INPUT_LENGTH})")
  p.add_argument("--all_decodes", action="store_true", help="print every beam / sample, best first")
  p.add_argument("--json", default=None, help="also write the outputs here")
  p.add_argument("--predictors", default=None, help="predictors file (topk-train-predictors) for predicted decoding")
  p.add_argument("--candidates", type=int, default=None, help="candidate units per decoder MLP step with --predictors")
  args = p.parse_args(rest)
  check_settings(args)
  check_utf8(args.input)
  if args.candidates is not None:
    bindings = [*bindings, f"network.T5Config.decode_candidates = {args.candidates}"]
  texts = list(args.input)
  if args.input_file:
    texts.extend(common.read_lines(args.input_file))
  if not texts:
    raise common.ConfigError("give --input TEXT (repeatable) or --input_file")
  gin_utils.configure(gin_files, bindings)
  model = gin_utils.get_macro("MODEL")  # its vocabulary gives the input shapes
  n = len(texts)
  length = args.input_length or input_length(gin_utils)
  inputs = text.encode_texts(texts, model.input_vocabulary, length)  # [n, <= length]: cut, with a warning
  shapes = {"encoder_input_tokens": inputs.shape, "decoder_input_tokens": (n, args.max_decode_length)}
  run = runs.load_run(args.checkpoint, model=model, input_shapes=shapes)
  extra = {}
  if args.predictors:
    from topk_transformers import predictors  # pylint: disable=g-import-not-at-top

    extra["predictors"] = predictors.restore(args.predictors, run.params)[0]
  out = text.decode_texts(run, texts, args.max_decode_length, all_decodes=args.all_decodes, inputs=inputs,
                          decode_method=args.method, num_decodes=args.num_decodes, alpha=args.alpha,
                          temperature=args.temperature, topk=args.topk, topp=args.topp,
                          rng=jax.random.PRNGKey(args.seed), **extra)
  print(f"checkpoint step {out['step']}; {args.method} decoding of {n} input(s) in {out['seconds']:.2f}s "
        "(compilation included)")
  for result in out["results"]:
    print(f"input:  {result['input']}")
    for o in result["outputs"]:
      print(f"output: {o['text']}    (score {o['score']:.3f})")
  common.write_json(args.json, {"checkpoint": args.checkpoint, "method": args.method, **out})
  return 0
