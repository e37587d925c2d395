"""The device check (``benchmarks/device_check.sh``): its smoke mode end to end on the CPU, without TensorFlow,
seqio or gin; its peak table and FLOP count."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from topk_transformers.benchmarks import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocked_packages(path):
  """A directory whose ``tensorflow``, ``seqio``, ``gin`` and ``tensorflow_datasets`` fail to import."""
  for name in ("tensorflow", "seqio", "gin", "tensorflow_datasets"):
    os.makedirs(path / name)
    (path / name / "__init__.py").write_text(f"raise ImportError('{name} is not on a bare GPU machine')\n")
  return str(path)


@pytest.mark.slow  # about a minute on an idle 2-core CPU, several on a loaded one
def test_smoke_mode_runs_every_stage_and_writes_the_json(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, PYTHON=sys.executable,
             PYTHONPATH=_blocked_packages(tmp_path / "blocked") + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("TOPK_AUTOTUNE", None)  # the check measures (with its own cache), whatever the suite's setting
  done = subprocess.run([os.path.join(ROOT, "benchmarks", "device_check.sh"), str(out), "--smoke"], env=env,
                        capture_output=True, text=True, timeout=1500, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  summary = json.loads((out / "device_check.json").read_text())
  assert {s: v["status"] for s, v in summary["stages"].items()} == {"kernels": "ok", "train": "ok", "decode": "ok"}
  assert summary["machine"]["platform"] == "cpu" and summary["machine"]["smoke"] is True
  assert summary["peaks"]["bf16_flops"] is None  # no peak for a CPU: MFU and bandwidth shares stay empty

  kernels = summary["kernels"]
  assert kernels["interpret"] and kernels["all_ok"]
  assert {(r["platform"], r["op"], r["dtype"]) for r in kernels["rows"]} == {
      (p, op, dt) for p in ("triton", "mosaic") for op in ("gather_matvec", "gather_vecmat")
      for dt in ("float32", "bfloat16")}
  assert {c["choice"] for c in summary["autotune_choices"]} == {"decode_path", "rows/gather_vecmat",
                                                                 "rows/gather_matvec"}

  train = {r["variant"]: r for r in summary["train"]}
  assert set(train) == {"dense", "exact/8", "approx/8", "threshold/8", "auto/8"}
  assert train["dense"]["ratio_to_dense"] == 1.0
  assert train["threshold/8"]["same_loss_as_exact"] and train["auto/8"]["same_loss_as_exact"]
  assert train["auto/8"]["resolves_to"] in ("exact", "threshold", "threshold/exact", "exact/threshold")
  assert all(r["model_flops_per_step"] > 0 and r["mfu"] is None for r in train.values())

  decode = {(r["dtype"], r["name"].split("/")[0]) for r in summary["decode"]}
  assert decode == {(dt, v) for dt in ("float32", "bfloat16") for v in ("dense", "dense@in_out", "sparse", "predicted")}
  assert all(r["share_of_vecmat_rate"]["vecmat/W@y"] > 0 for r in summary["decode"] if r["name"] == "dense")
  assert all(r["weight_bytes_per_s"] > 0 for r in summary["decode"])

  # The cache the run produced: the selection of the 'auto' training variant, measured here.
  cache = summary["autotune_cache"]
  assert cache == json.loads((out / "autotune_cache.json").read_text())["entries"]
  assert any(key.startswith("selection|cpu|") for key in cache)
  assert any(key.startswith("decode_path|cpu|") for key in cache)


def test_peaks_are_looked_up_by_device_kind():
  assert device_check.peaks("NVIDIA H100 80GB HBM3")["memory_bytes_per_s"] == 3.35e12
  assert device_check.peaks("NVIDIA H100 PCIe")["bf16_flops"] == 756e12
  assert device_check.peaks("NVIDIA H200")["memory_bytes_per_s"] == 4.8e12
  assert device_check.peaks("TPU v5 lite")["bf16_flops"] == 197e12
  assert device_check.peaks("cpu") == {"matched": None, "bf16_flops": None, "memory_bytes_per_s": None}


def test_model_flops_match_xla_s_count_of_a_dense_forward():
  # XLA's cost analysis of the forward pass counts 2 FLOPs per multiply-add of every dot (plus elementwise work); the
  # training count is 3 forwards.
  from topk_transformers.t5 import network  # pylint: disable=g-import-not-at-top

  cfg = network.T5Config(vocab_size=512, emb_dim=256, num_heads=4, head_dim=64, num_encoder_layers=2,
                         num_decoder_layers=2, mlp_dim=1024, dropout_rate=0.0)
  model = network.Transformer(cfg)
  inputs, targets = jnp.ones((2, 64), jnp.int32), jnp.ones((2, 16), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), inputs, targets, targets, enable_dropout=False))
  forward = jax.jit(lambda p: model.apply(p, inputs, targets, targets, enable_dropout=False))
  cost = forward.lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = device_check.t5_train_flops(256, 1024, 256, 2, 512, 2, 64, 16) / 3
  assert ours == pytest.approx(cost["flops"], rel=0.1)


def test_the_device_run_s_flags_are_valid_for_both_benchmarks(tmp_path, monkeypatch):
  # The first device run must not be where a bad flag is found: the full mode's arguments go through each command's
  # own parser and settings checks, with the benchmark itself replaced.
  from topk_transformers.benchmarks import decoding  # pylint: disable=g-import-not-at-top
  from topk_transformers.benchmarks import training  # pylint: disable=g-import-not-at-top
  from topk_transformers.commands import bench_decode  # pylint: disable=g-import-not-at-top
  from topk_transformers.commands import bench_train  # pylint: disable=g-import-not-at-top

  seen = {}
  monkeypatch.setattr(training, "run", lambda settings, command="": seen.setdefault("train", settings) and {})
  monkeypatch.setattr(decoding, "run", lambda settings, command="": seen.setdefault("decode", settings) and {})
  assert bench_train.main(device_check.train_args(str(tmp_path), smoke=False)) == 0
  assert bench_decode.main(device_check.decode_args(str(tmp_path), smoke=False)) == 0
  train, decode = seen["train"], seen["decode"]
  assert train.models == ("t5_1.0",) and train.sizes == ("base", "large") and train.dtype == "bfloat16"
  assert set(train.methods) == {"exact", "approx", "threshold", "auto"} and train.ks == (128,)
  assert decode.sizes == ("large",) and decode.version == "1.0" and decode.num_layers is None  # 24 decoder layers
  assert decode.dtypes == ("float32", "bfloat16") and decode.predicted and decode.candidates == (256,)
  assert sum(device_check.LIMITS.values()) <= device_check.BUDGET_S <= 8 * 60
