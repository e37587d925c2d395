"""experiments/t5_small_gpu: span-corruption examples written here, a gin- and TensorFlow-free trainer that
measures per-layer sparsity and the paper's firing statistic on the whole held-out split."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(ROOT, "experiments", "t5_small_gpu", "prepare.py")
RUN = os.path.join(ROOT, "experiments", "t5_small_gpu", "run.py")
# The device image has no TensorFlow, seqio or gin: the trainer must run with them unimportable.
WITHOUT_TF = ("import runpy, sys\n"
              "for name in ('tensorflow', 'seqio', 'gin', 'tensorflow_datasets', 'clu'):\n"
              "  sys.modules[name] = None\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _run(*args, without_tf=False):
  cmd = [sys.executable, "-c", WITHOUT_TF, RUN, *args] if without_tf else [sys.executable, RUN, *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
  path = tmp_path_factory.mktemp("t5_small_gpu") / "examples.npz"
  done = subprocess.run([sys.executable, PREPARE, f"--out={path}", "--passes=2", "--inputs_length=64",
                         "--targets_length=16", "--limit=24"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  return path


def test_prepare_writes_two_differently_corrupted_passes_and_the_held_out_split(examples):
  with np.load(examples) as f:
    data = {k: f[k] for k in f.files}
  meta = json.loads(str(data["meta"]))
  assert meta["lengths"] == {"inputs": 64, "targets": 16} and meta["vocab_size"] == 4096 and meta["passes"] == 2
  assert data["train_inputs"].shape == (48, 64) and data["train_targets"].shape == (48, 16)
  assert data["eval_inputs"].shape == (24, 64) and meta["eval_examples"] == 24
  assert data["train_inputs"].dtype == np.uint16
  # Every row is real tokens, then zeros; seqio appends EOS (1) when the row is not full.
  for row in data["train_inputs"]:
    real = row[row > 0]
    assert real.size and np.all(row[:real.size] > 0) and np.all(row[real.size:] == 0)
  sentinels = data["train_inputs"] >= 4096 - 100
  assert sentinels.any(axis=1).all()  # span corruption put sentinels in every input
  # Two passes with their own seeds: other spans (and another order) in the second.
  assert not np.array_equal(data["train_inputs"][:24], data["train_inputs"][24:])


@pytest.fixture(scope="module")
def smoke_run(examples, tmp_path_factory):
  out = tmp_path_factory.mktemp("t5_small_gpu_out")
  done = _run(f"--examples={examples}", f"--out={out}", "--smoke", "--max_steps=3", "--batch=5", without_tf=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return done, json.loads((out / "t5_small_gpu.json").read_text())


def test_trainer_runs_without_tensorflow_and_measures_every_held_out_token(examples, smoke_run):
  done, payload = smoke_run
  assert payload["steps"] == 3 and payload["config"]["batch"] == 5 and payload["config"]["d_ff"] == 64
  assert [c["step"] for c in payload["curve"]] == [0] and payload["final"]["step"] == 3
  with np.load(examples) as f:
    enc_tokens, dec_tokens = int((f["eval_inputs"] > 0).sum()), int((f["eval_targets"] > 0).sum())
  layers = payload["final"]["layers"]
  assert list(layers) == ["encoder/layers_0", "decoder/layers_0"]
  # 24 held-out examples in batches of 5, the last one padded: each real token counted once, padding never.
  assert layers["encoder/layers_0"]["tokens"] == enc_tokens and layers["decoder/layers_0"]["tokens"] == dec_tokens
  for row in layers.values():
    assert 0 < row["percent_nonzero"] < 100
    assert 0 <= row["fraction_never_firing"] <= row["fraction_firing_below_10pct"] <= 1
  assert payload["final"]["mean_percent_nonzero"] == pytest.approx(
      np.mean([r["percent_nonzero"] for r in layers.values()]))
  assert payload["tokens_seen"] == 3 * 5 * (64 + 16) and payload["device"]["platform"] == "cpu"
  assert "encoder/layers_0" in done.stdout and "wrote" in done.stdout


def test_bad_examples_and_arguments_are_one_line_errors(examples, tmp_path):
  missing = _run(f"--examples={tmp_path / 'none.npz'}", f"--out={tmp_path}", "--smoke")
  assert missing.returncode == 2 and "prepare.py" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not an archive")
  bad = _run(f"--examples={junk}", f"--out={tmp_path}", "--smoke")
  assert bad.returncode == 2 and "not an archive" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
  big = _run(f"--examples={examples}", f"--out={tmp_path}", "--batch=200")
  assert big.returncode == 2 and "more than the 48 train examples" in big.stderr
  assert not (tmp_path / "t5_small_gpu.json").exists()


def test_results_page_is_made_from_the_json_and_says_a_smoke_run_is_one(smoke_run, tmp_path):
  spec = importlib.util.spec_from_file_location("make_results_for_t5_small", os.path.join(ROOT, "scripts",
                                                                                         "make_results.py"))
  make_results = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_results)
  assert make_results.t5_small_gpu_page(tmp_path) is None  # no JSON yet, no page
  _, payload = smoke_run
  path = tmp_path / make_results.T5_SMALL
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps(payload))
  text, head = make_results.t5_small_gpu_page(tmp_path)
  assert "**A smoke run**" in text and head["smoke"] and "1+1 layers, d_model 32" in text
  end, first = payload["final"]["layers"], payload["curve"][0]["layers"]
  for name, row in end.items():
    assert (f"| {name} | {first[name]['percent_nonzero']:.2f} | {row['percent_nonzero']:.2f} | "
            f"{100 * first[name]['fraction_firing_below_10pct']:.1f} | "
            f"{100 * row['fraction_firing_below_10pct']:.1f} | {100 * row['fraction_never_firing']:.1f} |") in text
  assert "| 3 | " in text and payload["command"] in text
  # With the JSON in place the page joins the results and the README's headline block names the device.
  make_results.T5_SMALL = str(path)
  out = make_results.generate(make_results.ROOT)
  assert out["docs/results/t5_small_gpu.md"].split("\n", 1)[1] == text.split("\n", 1)[1]  # all but the source line
  assert "| cpu (smoke run), embedded corpus | [t5_small_gpu](docs/results/t5_small_gpu.md) |" in out["README.md"]
