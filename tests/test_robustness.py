"""Tests for topk_transformers/robustness.py and scripts/robustness_table.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from topk_transformers import robustness
from topk_transformers.vit import model as vit_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batches(probs, labels, batch_size):
  """Eval-style batches: the last one padded with zero images of weight 0."""
  n = len(labels)
  out = []
  for start in range(0, n, batch_size):
    p, l = probs[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(l)
    # The "image" carries the example's probabilities so a predict_fn can look them up.
    image = np.concatenate([p, np.zeros((pad, p.shape[1]))]) if pad else p
    out.append({"image": image, "label": np.concatenate([l, np.zeros(pad, int)]),
                "weight": np.array([1.0] * len(l) + [0.0] * pad, np.float32)})
  return out


def _identity(images):
  # Padding rows (all zero) become uniform probabilities: valid, and wrong if counted.
  images = np.asarray(images, np.float64)
  zero = images.sum(-1) == 0
  images[zero] = 1.0 / images.shape[1]
  return images


def _random_probs(n, k, seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, k)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  labels = np.where(rng.random(n) < 0.6, probs.argmax(-1), rng.integers(0, k, n))
  return probs, labels


def test_evaluate_dataset_ignores_padding_and_matches_the_ece():
  probs, labels = _random_probs(103, 5, 0)
  out = robustness.evaluate_dataset(_identity, _batches(probs, labels, 16))
  assert out["num_examples"] == 103
  np.testing.assert_allclose(out["accuracy"], np.mean(probs.argmax(-1) == labels), rtol=1e-6)
  whole = float(vit_model.expected_calibration_error(probs, labels, num_bins=15))
  np.testing.assert_allclose(out["ece"], whole, rtol=1e-5)
  assert out["ece"] > 0.01  # The example is miscalibrated: the comparison is not 0 == 0.
  rel = robustness.reliability(out["bins"])
  assert sum(rel["count"]) == 103 and len(rel["bin_edges"]) == 16


def test_default_bins_are_the_models():
  assert robustness.NUM_BINS == vit_model.DEFAULT_NUM_BINS == 15


def test_evaluate_dataset_rejects_logits_and_empty_data():
  probs, labels = _random_probs(8, 3, 1)
  with pytest.raises(ValueError, match="softmax"):
    robustness.evaluate_dataset(lambda x: np.log(x), _batches(probs, labels, 8))
  empty = [{"image": probs, "label": labels, "weight": np.zeros(8, np.float32)}]
  with pytest.raises(ValueError, match="no examples"):
    robustness.evaluate_dataset(_identity, empty)


class _FakeImageDataset:
  """Duck-typed ImageDataset: eval batches of stored probabilities; corruptions shift them."""

  tfds_name = "fake"
  eval_split = "test"
  label_noise = 0.4

  def __init__(self, probs, labels):
    self.probs, self.labels = probs, labels

  def get_dataset(self, split, batch_size, shuffle=True, repeat=True, **unused):
    assert split == "test" and not shuffle and not repeat
    return _batches(self.probs, self.labels, batch_size)

  def get_corrupted_dataset(self, corruption, severity, batch_size, seed=0):
    # Severity s makes the first 10 * s examples wrong: accuracy falls linearly.
    probs = self.probs.copy()
    wrong = np.eye(probs.shape[1])[(self.labels + 1) % probs.shape[1]]
    probs[:10 * severity] = wrong[:10 * severity]
    return _batches(probs, self.labels, batch_size)


def test_evaluate_builds_the_results_dict_and_diagram(tmp_path):
  k, n = 4, 100
  labels = np.arange(n) % k
  probs = np.eye(k)[labels] * 0.7 + 0.3 / k  # Always right, 77.5% confident: ECE 0.225.
  results = robustness.evaluate(_identity, _FakeImageDataset(probs, labels), batch_size=32,
                                corruptions=("gaussian_noise", "impulse_noise"), run_dir=str(tmp_path),
                                seed=2, top_k=16)
  assert results["name"] == "top16" and results["seed"] == 2 and results["label_noise"] == 0.4
  assert results["num_examples"] == n and results["accuracy"] == 1.0
  np.testing.assert_allclose(results["ece"], 0.225, rtol=1e-5)
  for c in ("gaussian_noise", "impulse_noise"):
    accs = results["corruptions"][c]
    assert [accs[str(s)] for s in range(1, 6)] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    assert accs["mean"] == pytest.approx(0.7)
  png = tmp_path / results["reliability_diagram"]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
  path = robustness.write_results(str(tmp_path), results)
  assert robustness.load_results(str(tmp_path)) == json.loads(open(path).read()) == results


def _run(tmp_path, name, seed, noise, acc, ece, gauss=None):
  results = {"name": name, "seed": seed, "label_noise": noise, "accuracy": acc, "ece": ece}
  if gauss is not None:
    results["corruptions"] = {"gaussian_noise": {"1": gauss + 0.1, "5": gauss - 0.1, "mean": gauss}}
  run_dir = tmp_path / f"{name}_{noise}_{seed}"
  robustness.write_results(str(run_dir), results)
  return str(run_dir)


@pytest.fixture
def fake_runs(tmp_path):
  dirs = []
  for seed, (a, b) in enumerate([(0.90, 0.92), (0.92, 0.93), (0.94, 0.97)]):
    dirs.append(_run(tmp_path, "dense", seed, 0.0, a, 0.08 + seed / 100, gauss=a - 0.3))
    dirs.append(_run(tmp_path, "top16", seed, 0.0, b, 0.05, gauss=b - 0.2))
    dirs.append(_run(tmp_path, "dense", seed, 0.4, a - 0.2, 0.2))
  dirs.append(_run(tmp_path, "top16", 0, 0.8, 0.5, 0.3))
  return dirs


def test_build_table(fake_runs):
  table = robustness.build_table([robustness.load_results(d) for d in fake_runs])
  assert table["columns"] == ["dense", "top16"]
  rows = {r["key"]: r for r in table["rows"]}
  assert [r["key"] for r in table["rows"]] == ["accuracy", "label_noise_0.4", "label_noise_0.8",
                                               "corruption_gaussian_noise", "ece"]
  acc = rows["accuracy"]["cells"]["dense"]
  assert acc["n"] == 3 and acc["values"] == [0.90, 0.92, 0.94]
  np.testing.assert_allclose([acc["mean"], acc["std"]], [0.92, 0.02])  # Sample std (ddof=1).
  np.testing.assert_allclose(rows["corruption_gaussian_noise"]["cells"]["top16"]["mean"], 0.74)
  np.testing.assert_allclose(rows["label_noise_0.4"]["cells"]["dense"]["mean"], 0.72)
  assert rows["label_noise_0.4"]["cells"]["top16"] is None
  single = rows["label_noise_0.8"]["cells"]["top16"]
  assert single["n"] == 1 and single["std"] is None and single["mean"] == 0.5
  assert rows["ece"]["cells"]["top16"]["std"] == pytest.approx(0.0, abs=1e-12)

  md = robustness.table_markdown(table)
  assert "| | dense | top16 |" in md
  assert "| Accuracy | 92.00 ± 2.00 (n=3) | 94.00 ± 2.65 (n=3) |" in md
  assert "| 40% label noise | 72.00 ± 2.00 (n=3) | – |" in md
  assert "| 80% label noise | – | 50.00 |" in md
  assert "| ECE (%) | 9.00 ± 1.00 (n=3) | 5.00 ± 0.00 (n=3) |" in md


def test_table_script(fake_runs, tmp_path):
  out_json, out_md = tmp_path / "table.json", tmp_path / "table.md"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "robustness_table.py"), *fake_runs,
                         "--json", str(out_json), "--markdown", str(out_md)],
                        capture_output=True, text=True, check=True)
  assert proc.stdout == out_md.read_text()
  table = json.loads(out_json.read_text())
  assert table["columns"] == ["dense", "top16"] and table["run_dirs"] == fake_runs
  assert "Gaussian noise" in proc.stdout
  missing = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "robustness_table.py"),
                            str(tmp_path / "no_such_run")], capture_output=True, text=True)
  assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: no eval_results.json")


def test_load_results_errors(tmp_path):
  with pytest.raises(ValueError, match="eval_results.json"):
    robustness.load_results(str(tmp_path))
  (tmp_path / "eval_results.json").write_text(json.dumps({"name": "x"}))
  with pytest.raises(ValueError, match="accuracy"):
    robustness.load_results(str(tmp_path))
  (tmp_path / "eval_results.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    robustness.load_results(str(tmp_path))
