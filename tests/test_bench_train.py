"""The training benchmark (library and ``topk-bench-train``) on tiny shapes: it runs, compares and writes."""

import json

from topk_transformers.benchmarks import training
from topk_transformers.commands import bench_train
from topk_transformers.errors import ConfigError

import pytest

TINY = dict(models=("t5_1.1", "vit"), sizes=("tiny",), ks=(16, 512), methods=("exact", "threshold"), num_layers=1,
            batch_size=2, input_length=8, target_length=4, image_size=32, vocab_size=128, reps=2)


def test_library_times_dense_against_every_method_and_k_in_one_run():
  result = training.run(training.Settings(**TINY, selection=False))
  rows = result["results"]
  assert {r["model"] for r in rows} == {"t5_1.1", "vit"}  # t5_1.0 runs in the command's test
  for model in ("t5_1.1", "vit"):
    names = [r["variant"] for r in rows if r["model"] == model]
    assert names == ["dense", "exact/16", "threshold/16"]  # k=512 >= d_ff is skipped: it would be dense
  for r in rows:
    assert len(r["all_s"]) == 2 and r["median_s"] > 0 and r["min_s"] <= r["median_s"]
    assert r["layers"] == 1 and r["published_layers"] >= 2
    if r["variant"] == "dense":
      assert r["ratio"] == 1.0 and r["k"] is None
    if r["method"] == "threshold":
      assert r["same_loss_as_exact"] is True and r["resolves_to"] == "threshold"
  assert result["machine"]["platform"] and len(result["machine"]["load_average_at_end"]) == 3
  table = training.markdown(result)
  assert "| t5_1.1 | tiny | 1 | 256 | threshold | 16 |" in table


def test_selection_microbenchmark_covers_every_method():
  rows = training.bench_selection(training.Settings(**TINY, selection_reps=1))
  assert [r["variant"] for r in rows] == ["dense", *training.topk.METHODS]
  for r in rows[1:]:
    assert r["same_gradients_as_exact"] is True and r["d_ff"] == 2048 and r["k"] == 128


def test_command_writes_json_and_markdown(tmp_path):
  out_json, out_md = tmp_path / "train.json", tmp_path / "train.md"
  status = bench_train.main(["--models=t5_1.0", "--sizes=tiny", "--k=16", "--methods=threshold", "--num_layers=1",
                             "--batch_size=1", "--input_length=8", "--target_length=4", "--vocab_size=128", "--reps=1",
                             "--no_selection", f"--json={out_json}", f"--markdown={out_md}"])
  assert status == 0
  result = json.loads(out_json.read_text())
  assert result["command"].startswith("topk-bench-train --models=t5_1.0")
  assert [r["variant"] for r in result["results"]] == ["dense", "threshold/16"]
  assert result["settings"]["num_layers"] == 1 and result["selection"] == []
  assert "| t5_1.0 | tiny | 1 | 256 | threshold | 16 |" in out_md.read_text()


def test_bad_settings_are_one_line_errors(capsys):
  with pytest.raises(ConfigError, match="--methods"):
    training.Settings(methods=("sort",))
  with pytest.raises(ConfigError, match="--sizes"):
    training.Settings(sizes=("huge",))
  assert bench_train.main(["--k=0"]) == 2
  assert "error:" in capsys.readouterr().err
