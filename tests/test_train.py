"""The trainer on a toy model: resume, preemption, non-finite loss, incompatible checkpoints."""

import os
import shutil
import signal

import jax
import numpy as np
import optax
import pytest

from topk_transformers import checkpoints, partitioning, train
from conftest import assert_trees_equal
import toy
from toy import ToyDataset, ToyModel, ToyNet


def _run(model_dir, steps, model=None, checkpoint_period=5, **kw):
  return train.train(model=model or ToyModel(), dataset=ToyDataset(), model_dir=str(model_dir), train_steps=steps,
                     batch_size=32, optimizer=optax.adam, learning_rate=lambda s: 1e-2, eval_period=0,
                     log_period=5, checkpoint_period=checkpoint_period, **kw)


def _params(result):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(result.state.params))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 16-step run (its 5-step checkpoint is reused by the error tests)."""
  model_dir = tmp_path_factory.mktemp("straight")
  return model_dir, _run(model_dir, 16)


def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path, straight):
  _run(tmp_path / "resumed", 7)  # stops at 7 (not a multiple of the checkpoint period)
  resumed = _run(tmp_path / "resumed", 16)
  assert int(resumed.state.step) == 16
  assert_trees_equal(_params(straight[1]), _params(resumed))
  # The run learns: the toy classes are separable.
  assert straight[1].train_metrics["accuracy"] > 0.8


def _signal_at_batch(monkeypatch, signum, batch_number=4, times=1):
  """Sends this process ``signum`` (``times`` times) as the trainer shards its ``batch_number``-th batch; returns the
  unpatched method."""
  calls = {"n": 0}
  original = partitioning.Partitioner.shard_batch

  def shard_and_maybe_signal(self, batch):
    calls["n"] += 1
    if calls["n"] == batch_number:
      for _ in range(times):
        os.kill(os.getpid(), signum)
    return original(self, batch)

  monkeypatch.setattr(partitioning.Partitioner, "shard_batch", shard_and_maybe_signal)
  return original


def test_sigterm_writes_checkpoint_and_restart_continues(tmp_path, monkeypatch, straight):
  original = _signal_at_batch(monkeypatch, signal.SIGTERM)
  result = _run(tmp_path / "run", 16, checkpoint_period=100)
  assert result.preempted and int(result.state.step) == 4
  assert checkpoints.CheckpointManager(str(tmp_path / "run")).latest_step() == 4
  monkeypatch.setattr(partitioning.Partitioner, "shard_batch", original)
  resumed = _run(tmp_path / "run", 16)
  assert_trees_equal(_params(straight[1]), _params(resumed))


def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(train.NonFiniteLossError, match=r"at step 7\b.*last good checkpoint is step 5"):
    _run(tmp_path / "run", 20, model=ToyModel(nan_at_step=7))
  manager = checkpoints.CheckpointManager(str(tmp_path / "run"))
  assert manager.latest_step() == 5


def _copy_of(straight, tmp_path):
  """A copy of the straight run's directory (latest checkpoint: step 16)."""
  run = tmp_path / "run"
  shutil.copytree(straight[0], run)
  return run


def test_checkpoint_of_another_model_shape_is_a_clear_error(tmp_path, straight):
  _copy_of(straight, tmp_path)
  with pytest.raises(checkpoints.CheckpointError, match=r"different model: '.*mlp/wi/kernel' has shape"):
    _run(tmp_path / "run", 20, model=ToyModel(ToyNet(hidden=32)))


def test_corrupt_checkpoint_is_a_clear_error_and_deletes_nothing(tmp_path, straight):
  _copy_of(straight, tmp_path)
  step_dir = tmp_path / "run" / "checkpoints" / "16" / "state"
  victims = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0 and "metadata" not in p.name]
  assert victims
  for p in victims:
    p.write_bytes(b"\0garbage")
  with pytest.raises(checkpoints.CheckpointError, match="cannot be read"):
    _run(tmp_path / "run", 20)
  assert (tmp_path / "run" / "checkpoints" / "16").exists()


def test_bad_batch_size_is_one_line_error(tmp_path):
  with pytest.raises(ValueError, match="batch_size=0"):
    train.train(model=ToyModel(), dataset=ToyDataset(), model_dir=str(tmp_path), train_steps=1, batch_size=0)


def test_train_command_turns_a_bad_mesh_binding_into_one_line_and_exit_2(tmp_path, capsys):
  from topk_transformers.commands import train as train_command

  assert train_command.main(["--gin_file=t5/runs/cpu_smoke.gin", f"--gin.MODEL_DIR='{tmp_path}'",
                             "--gin.NUM_PARTITIONS=3"]) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert err == [f"error: num_partitions=3 does not divide the {jax.device_count()} devices"]


@pytest.mark.parametrize("binding, message", [("--gin.TOP_K=0", "top_k must be a positive integer or None, got 0"),
                                              ("--gin.TOP_K_METHOD='sorted'", "top_k_method must be one of")])
def test_train_command_turns_a_bad_top_k_into_one_line_and_exit_2(tmp_path, capsys, binding, message):
  from topk_transformers.commands import train as train_command

  assert train_command.main(["--gin_file=t5/runs/cpu_smoke.gin", f"--gin.MODEL_DIR='{tmp_path}'", binding]) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ---------------------------------------------------------------------------
# A rejected launch writes nothing
# ---------------------------------------------------------------------------

_TOY_GIN = toy.train_gin("HIDDEN = 64\ntoy.ToyNet.hidden = %HIDDEN\ntoy.ToyModel.module = @toy.ToyNet()",
                         log_period="5", checkpoint_period="5")


def _launch(tmp_path, model_dir, *bindings):
  """``train_from_gin`` on the toy gin file, as ``topk-train`` runs it."""
  from topk_transformers import gin_utils

  gin_file = tmp_path / "toy.gin"
  gin_file.write_text(_TOY_GIN)
  gin_utils.configure([str(gin_file)], [f"MODEL_DIR = '{model_dir}'", *bindings])
  try:
    return train.train_from_gin()
  finally:
    import gin
    gin.clear_config()


def _snapshot(directory):
  return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")}


def test_a_launch_rejected_for_its_checkpoint_leaves_the_run_as_it_was(tmp_path, straight):
  run = _copy_of(straight, tmp_path)
  (run / "config.gin").write_text("# the launch that wrote checkpoint 16\n")
  before = _snapshot(run)
  with pytest.raises(checkpoints.CheckpointError, match="different model"):
    _launch(tmp_path, run, "TRAIN_STEPS = 20", "HIDDEN = 32")
  assert _snapshot(run) == before
  # The accepted launch records its configuration.
  assert int(_launch(tmp_path, run, "TRAIN_STEPS = 17").state.step) == 17
  recorded = (run / "config.gin").read_text()
  assert "TRAIN_STEPS = 17" in recorded and "toy.ToyNet.hidden = %HIDDEN" in recorded


def test_a_fresh_launch_rejected_after_its_checkpoint_directory_was_made_leaves_no_model_dir(tmp_path, monkeypatch):
  from topk_transformers import evaluators

  def reject(*args, **kwargs):
    raise train.ConfigError("no such evaluator")

  monkeypatch.setattr(evaluators, "build", reject)
  with pytest.raises(train.ConfigError, match="no such evaluator"):
    _launch(tmp_path, tmp_path / "fresh", "TRAIN_STEPS = 3")
  assert not (tmp_path / "fresh").exists()
  # A MODEL_DIR made beforehand (empty, or with the user's own files) stays as it was.
  made = tmp_path / "made"
  made.mkdir()
  (made / "notes.txt").write_text("mine\n")
  with pytest.raises(train.ConfigError, match="no such evaluator"):
    _launch(tmp_path, made, "TRAIN_STEPS = 3")
  assert _snapshot(made) == {"notes.txt": b"mine\n"}


def test_topk_train_rejected_for_top_k_0_changes_nothing_in_model_dir(tmp_path, capsys):
  from topk_transformers.commands import train as train_command

  run = tmp_path / "run"
  run.mkdir()
  (run / "config.gin").write_text("TOP_K = 64\n")
  before = _snapshot(run)
  for model_dir in (run, tmp_path / "fresh"):
    assert train_command.main(["--gin_file=t5/runs/cpu_smoke.gin", f"--gin.MODEL_DIR='{model_dir}'",
                               "--gin.TOP_K=0"]) == 2
    assert "top_k must be a positive integer" in capsys.readouterr().err
  assert _snapshot(run) == before
  assert not (tmp_path / "fresh").exists()


# ---------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------


def test_ctrl_c_writes_checkpoint_like_sigterm_and_restart_continues(tmp_path, monkeypatch, straight):
  original = _signal_at_batch(monkeypatch, signal.SIGINT)
  result = _run(tmp_path / "run", 16, checkpoint_period=100)
  assert result.preempted and result.stop_signal == "SIGINT" and int(result.state.step) == 4
  assert checkpoints.CheckpointManager(str(tmp_path / "run")).latest_step() == 4
  monkeypatch.setattr(partitioning.Partitioner, "shard_batch", original)
  resumed = _run(tmp_path / "run", 16)
  assert resumed.stop_signal is None
  assert_trees_equal(_params(straight[1]), _params(resumed))


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch):
  _signal_at_batch(monkeypatch, signal.SIGINT, times=2)
  previous = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    _run(tmp_path / "run", 16, checkpoint_period=100)
  assert signal.getsignal(signal.SIGINT) is previous  # the trainer's handlers are gone again
  assert checkpoints.CheckpointManager(str(tmp_path / "run")).latest_step() is None


def test_topk_train_after_a_second_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
  from topk_transformers.commands import train as train_command

  _signal_at_batch(monkeypatch, signal.SIGINT, batch_number=3, times=2)
  gin_file = tmp_path / "toy.gin"
  gin_file.write_text(_TOY_GIN)
  try:
    status = train_command.main([f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                                 "--gin.TRAIN_STEPS=16"])
  finally:
    import gin
    gin.clear_config()
  assert status == 130
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert [line for line in err.splitlines() if line.startswith("error:")] == [
      "error: interrupted (Ctrl-C) without writing a checkpoint; run the same command again to resume from the last one"]


def test_resume_from_readable_passes_a_truncated_data_position_file(tmp_path, straight):
  run = _copy_of(straight, tmp_path)
  data_file = next((run / "checkpoints_data" / "16").glob("shard_0.data-*"))
  with open(data_file, "r+b") as f:
    f.truncate(data_file.stat().st_size // 2)
  with pytest.raises(checkpoints.UnreadableCheckpointError, match=r"^checkpoint step 16 at .* cannot be read \(its "
                     r"data position: .*shard_0\.data-\S+ has \d+ bytes, \d+ were written\)"):
    _run(run, 16)
  resumed = _run(run, 16, resume_from_readable=True)  # step 15's state and data position, then one step
  assert_trees_equal(_params(straight[1]), _params(resumed))
  assert (run / "checkpoints_unreadable" / "data" / "16").is_dir()


class _RandomBitsToy(ToyModel):
  """The toy with parameters of random bits (finite): zstd stores them raw, so garbage written into their file reads
  back as numbers, as bit-rot does (see test_checkpoints._flip_bytes)."""

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    variables = super().get_initial_variables(rng, input_shapes, input_types)
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(rng, len(leaves))
    bits = [jax.random.bits(k, x.shape, np.uint32) & np.uint32(0xBFFFFFFF) for k, x in zip(keys, leaves)]  # |x| < 2
    return jax.tree_util.tree_unflatten(treedef, [jax.lax.bitcast_convert_type(b, x.dtype) for b, x in
                                                  zip(bits, leaves)])


def test_resume_from_readable_passes_a_checkpoint_whose_array_file_was_damaged(tmp_path):
  from test_checkpoints import _flip_bytes

  run = tmp_path / "run"
  # Learning rate 0 keeps the random bits as they are (raw on disk); Adam's moments still follow the data position.
  frozen = lambda **kw: train.train(model=_RandomBitsToy(), dataset=ToyDataset(), model_dir=str(run), train_steps=16,
                                    batch_size=32, optimizer=optax.adam, learning_rate=lambda s: 0.0, eval_period=0,
                                    log_period=5, checkpoint_period=5, **kw)
  straight = frozen()
  _flip_bytes(run / "checkpoints" / "16" / "state", jax.device_get(straight.state.params["mlp"]["wi"]["kernel"]))
  with pytest.raises(checkpoints.UnreadableCheckpointError, match=r"^checkpoint step 16 at .* cannot be read \(array "
                     r"params/mlp/wi/kernel does not match its checksum"):
    frozen()
  resumed = frozen(resume_from_readable=True)  # step 15, then one step
  assert_trees_equal(jax.device_get(straight.state), jax.device_get(resumed.state))
  assert sorted(os.listdir(run / "checkpoints_unreadable")) == ["16", "data"]


def test_the_nan_message_names_only_a_verified_checkpoint_as_the_last_good_one(tmp_path, straight):
  run = _copy_of(straight, tmp_path)  # checkpoints 10, 15, 16 on disk
  with pytest.raises(train.NonFiniteLossError, match=r"at step 16\b.*last good checkpoint is step 16 in"):
    _run(run, 20, model=ToyModel(nan_at_step=16))  # resumed from 16, which verified
  for step in (10, 15, 16):  # as written before checksums were recorded: restored unverified
    shutil.rmtree(run / "checkpoints" / str(step) / "checksums")
  with pytest.raises(train.NonFiniteLossError) as err:
    _run(run, 20, model=ToyModel(nan_at_step=16), checkpoint_period=100)
  assert str(err.value) == ("loss or gradients became NaN/inf at step 16; training stopped and no checkpoint is "
                            f"verified: the newest, step 16 in {run}/checkpoints, has no checksums")


# ---------------------------------------------------------------------------
# A MODEL_DIR that cannot be used
# ---------------------------------------------------------------------------


def _topk_train_toy(tmp_path, model_dir, capsys):
  """``topk-train`` on the toy gin file: (exit status, stderr)."""
  from topk_transformers.commands import train as train_command

  gin_file = tmp_path / "toy.gin"
  gin_file.write_text(_TOY_GIN)
  try:
    status = train_command.main([f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=5"])
  finally:
    import gin
    gin.clear_config()
  return status, capsys.readouterr().err


def _assert_config_error(tmp_path, model_dir, message, capsys):
  """``topk-train`` on ``model_dir`` exits 2 with exactly ``error: message`` and no traceback."""
  status, err = _topk_train_toy(tmp_path, model_dir, capsys)
  assert status == 2
  assert "Traceback" not in err
  assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {message}"]


def test_topk_train_on_a_model_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine\n")
  for model_dir, message in ((a_file, f"MODEL_DIR {a_file} is a file, not a directory; name a directory"),
                             (a_file / "run", f"MODEL_DIR {a_file}/run cannot be made: {a_file} is a file, not a "
                                              "directory")):
    _assert_config_error(tmp_path, model_dir, message, capsys)
  assert a_file.read_text() == "mine\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "toy.gin"]


def test_topk_train_on_a_read_only_filesystem_is_one_line_and_exit_2(tmp_path, capsys):
  import tmpfs

  with tmpfs.mounted(tmp_path / "ro", "ro,size=1m") as ro:
    for model_dir, message in ((ro, f"MODEL_DIR {ro} cannot be written: it is on a read-only filesystem"),
                               (ro / "run", f"MODEL_DIR {ro}/run cannot be written: {ro} is on a read-only "
                                            "filesystem")):
      _assert_config_error(tmp_path, model_dir, message, capsys)


def test_a_full_disk_while_a_checkpoint_is_written_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch,
                                                                                          straight):
  """A real full disk (a 4 MiB tmpfs filled during step 7): the write of step 10 fails."""
  import tmpfs

  with tmpfs.mounted(tmp_path / "disk", "size=4m") as disk:
    run = disk / "run"
    _run(run, 5)
    original = partitioning.Partitioner.shard_batch
    calls = {"n": 0}

    def shard_and_fill_the_disk(self, batch):
      calls["n"] += 1
      if calls["n"] == 2:
        with open(disk / "filler", "wb", buffering=0) as f:
          try:
            while True:
              f.write(b"\0" * 4096)
          except OSError:
            pass
      return original(self, batch)

    monkeypatch.setattr(partitioning.Partitioner, "shard_batch", shard_and_fill_the_disk)
    with pytest.raises(checkpoints.CheckpointWriteError) as err:
      _run(run, 12)
    assert str(err.value) == (f"cannot write checkpoint step 10 in {run}/checkpoints (no space left on device); its "
                              "temporary files are removed and the newest checkpoint, step 5, is kept; free space "
                              "and run the same command again to resume")
    assert sorted(os.listdir(run / "checkpoints")) == ["5"]
    assert sorted(os.listdir(run / "checkpoints_data")) == ["5"]
    (disk / "filler").unlink()
    monkeypatch.setattr(partitioning.Partitioner, "shard_batch", original)
    resumed = _run(run, 16)  # from the kept step 5, verified, to the straight run's parameters
    assert_trees_equal(_params(straight[1]), _params(resumed))
