"""checkpoints: save and restore of the train state and data position, keep-N pruning, params-only restore, and the
one-line errors for a checkpoint that is missing or of another model.

Unreadable checkpoints (truncated files, ``skip_unreadable``) are exercised through the trainer in test_bad_inputs.py.
"""

import json
import os
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from topk_transformers import checkpoints
from topk_transformers.t5 import network


def tiny_state(module, seed=0):
  """A train state as the trainer saves it: params, Adafactor's state and the step."""
  tokens = jnp.ones((2, 4), jnp.int32)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(seed), tokens, tokens, tokens, enable_dropout=False))["params"]
  return {"params": params, "opt_state": optax.adafactor(1e-2).init(params), "step": jnp.asarray(seed, jnp.int32)}


def on_one_device(tree):
  """The abstract tree and its shardings, as restore_latest and restore_params take them."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.eval_shape(lambda t: t, tree), jax.tree_util.tree_map(lambda _: sharding, tree)


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture
def state(tiny_t5):
  return tiny_state(tiny_t5.module)


def test_an_empty_run_directory_restores_nothing(tmp_path, state):
  manager = checkpoints.CheckpointManager(str(tmp_path / "run"), async_save=False)
  assert manager.latest_step() is None and manager.all_steps() == []
  assert manager.restore_latest(*on_one_device(state)) is None
  manager.close()


def test_save_then_restore_latest_gives_the_newest_state_bit_exact(tmp_path, tiny_t5):
  old, new = tiny_state(tiny_t5.module, seed=1), tiny_state(tiny_t5.module, seed=2)
  manager = checkpoints.CheckpointManager(str(tmp_path / "run"))  # asynchronous, as the trainer saves
  manager.save(10, old)
  manager.save(20, new)
  manager.close()
  reopened = checkpoints.CheckpointManager(str(tmp_path / "run"))
  assert reopened.latest_step() == 20 and reopened.all_steps() == [10, 20]
  restored = reopened.restore_latest(*on_one_device(new))
  assert_trees_equal(restored, new)
  assert not np.array_equal(restored["params"]["encoder"]["layers_0"]["mlp"]["wi"]["kernel"],
                            old["params"]["encoder"]["layers_0"]["mlp"]["wi"]["kernel"])
  reopened.close()


def test_keep_n_prunes_old_steps_and_their_data_positions(tmp_path, state):
  run = str(tmp_path / "run")
  manager = checkpoints.CheckpointManager(run, keep=2, async_save=False)
  data = iter(tf.data.Dataset.range(100))
  for step in (1, 2, 3, 4):
    next(data)  # one batch a step
    manager.save(step, state, data)
  assert manager.all_steps() == [3, 4]
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["3", "4"]
  assert sorted(os.listdir(os.path.join(run, "checkpoints_data"))) == ["3", "4"]
  manager.close()
  # The restored data position is the one saved with the newest step: the stream goes on at batch 4.
  fresh = iter(tf.data.Dataset.range(100))
  checkpoints.CheckpointManager(run, keep=2).restore_latest(*on_one_device(state), data_iterator=fresh)
  assert int(next(fresh)) == 4


def test_keep_none_keeps_every_step(tmp_path, state):
  manager = checkpoints.CheckpointManager(str(tmp_path / "run"), keep=None, async_save=False)
  for step in range(1, 6):
    manager.save(step, state)
  assert manager.all_steps() == [1, 2, 3, 4, 5]
  manager.close()


def test_restore_params_reads_only_the_params_of_a_run_or_of_one_step(tmp_path, tiny_t5):
  run = str(tmp_path / "run")
  manager = checkpoints.CheckpointManager(run, async_save=False)
  first, second = tiny_state(tiny_t5.module, seed=1), tiny_state(tiny_t5.module, seed=2)
  manager.save(5, first)
  manager.save(7, second)
  manager.close()
  abstract, shardings = on_one_device(second["params"])
  params, step = checkpoints.restore_params(run, abstract, shardings)  # a run directory: its newest step
  assert step == 7
  assert_trees_equal(params, second["params"])
  params, step = checkpoints.restore_params(os.path.join(run, "checkpoints", "5"), abstract, shardings)
  assert step == 5
  assert_trees_equal(params, first["params"])


def test_a_read_abandoned_before_the_failure_surfaces_is_demoted_too(tmp_path, tiny_t5, monkeypatch):
  """orbax's other reads can be collected, and asyncio can log "Task exception was never retrieved" with a traceback,
  while the first failure is still on its way up: the filter must be in place before the read starts."""
  import logging  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  run = str(tmp_path / "run")
  manager = checkpoints.CheckpointManager(run, async_save=False)
  state = tiny_state(tiny_t5.module, seed=1)
  manager.save(3, state)
  manager.close()
  asyncio_logger = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_logger, "filters",
                      [f for f in asyncio_logger.filters if not isinstance(f, checkpoints._DemoteAbandonedTasks)])
  passed = []
  handler = logging.Handler()
  handler.emit = passed.append  # sees only the records that the logger's filters let through
  asyncio_logger.addHandler(handler)

  def failing_read(self, step):
    asyncio_logger.error("Task exception was never retrieved\nfuture: <Task finished name='Task-58'>")
    raise ValueError("NOT_FOUND: Error reading the array's metadata")

  monkeypatch.setattr(ocp.CheckpointManager, "item_metadata", failing_read)
  try:
    with pytest.raises(checkpoints.CheckpointError, match=r"\(metadata: ValueError: NOT_FOUND"):
      checkpoints.restore_params(run, *on_one_device(state["params"]))
  finally:
    asyncio_logger.removeHandler(handler)
  assert [r.getMessage() for r in passed] == []


def test_a_checkpoint_of_another_shape_is_a_one_line_error_naming_the_parameter(tmp_path, state, tiny_t5_config):
  run = str(tmp_path / "run")
  manager = checkpoints.CheckpointManager(run, async_save=False)
  manager.save(3, state)
  wider = tiny_state(network.Transformer(tiny_t5_config(mlp_dim=48)))
  with pytest.raises(checkpoints.CheckpointError) as info:
    manager.restore_latest(*on_one_device(wider))
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"checkpoint step 3 in {run}/checkpoints is of a different model: ")
  assert "has shape (16, 32) there but (16, 48) in this model; use another MODEL_DIR" in message
  assert "mlp/wi/kernel" in message


def test_a_checkpoint_with_other_parameters_is_a_one_line_error(tmp_path, state, tiny_t5_config):
  manager = checkpoints.CheckpointManager(str(tmp_path / "run"), async_save=False)
  manager.save(3, state)
  deeper = tiny_state(network.Transformer(tiny_t5_config(num_decoder_layers=2)))
  with pytest.raises(checkpoints.CheckpointError, match=r"missing parameter '.*decoder/layers_1/.*' \(\d+ missing, "
                     r"0 unexpected\); use another MODEL_DIR$"):
    manager.restore_latest(*on_one_device(deeper))
  # A checkpoint error is never the unreadable kind: skip_unreadable does not pass over it.
  with pytest.raises(checkpoints.CheckpointError) as info:
    manager.restore_latest(*on_one_device(deeper), skip_unreadable=True)
  assert not isinstance(info.value, checkpoints.UnreadableCheckpointError)


def test_restore_params_into_another_shape_is_a_one_line_error(tmp_path, state, tiny_t5_config):
  run = str(tmp_path / "run")
  manager = checkpoints.CheckpointManager(run, async_save=False)
  manager.save(2, state)
  manager.close()
  wider = tiny_state(network.Transformer(tiny_t5_config(mlp_dim=48)))["params"]
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.restore_params(run, *on_one_device(wider))
  assert str(info.value).startswith(f"cannot restore parameters from step 2 in {run}/checkpoints (")
  assert "\n" not in str(info.value)


def test_locate_finds_the_newest_step_and_names_what_is_missing(tmp_path):
  run = tmp_path / "run"
  for step in ("2", "10", "tmp"):
    (run / "checkpoints" / step).mkdir(parents=True)
  assert checkpoints.locate(str(run)) == (str(run / "checkpoints"), 10)  # numerically newest, not "2"
  assert checkpoints.locate(str(run / "checkpoints")) == (str(run / "checkpoints"), 10)
  assert checkpoints.locate(str(run / "checkpoints" / "2") + "/") == (str(run / "checkpoints"), 2)
  with pytest.raises(checkpoints.CheckpointError, match=r"^no checkpoint at '.*nowhere' \(expected a run directory"):
    checkpoints.locate(str(tmp_path / "nowhere"))
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(checkpoints.CheckpointError, match=r"^no checkpoint steps in '.*empty/checkpoints'$"):
    checkpoints.locate(str(tmp_path / "empty"))


# ---- checksums: what a checkpoint holds is verified at every restore

def _incompressible(state):
  """``state`` with its largest parameter of random bits (finite): zstd stores such data raw, with no checksum, so garbage
  written into it reads back as numbers (the bit-rot of the issue) instead of a decompression error."""
  leaves, treedef = jax.tree_util.tree_flatten(state["params"])
  big = max(range(len(leaves)), key=lambda i: leaves[i].size)
  bits = jax.random.bits(jax.random.PRNGKey(7), leaves[big].shape, jnp.uint32) & jnp.uint32(0xBFFFFFFF)  # |x| < 2
  leaves[big] = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return {**state, "params": jax.tree_util.tree_unflatten(treedef, leaves)}


def _flip_bytes(step_dir, array):
  """Garbage over the middle half of ``array``'s bytes where a data file under ``step_dir`` holds them raw (see
  :func:`_incompressible`), keeping the file's size: bit-rot that orbax reads back as numbers."""
  raw = np.asarray(array).tobytes()
  for path in step_dir.rglob("*"):
    if path.is_file() and path.parent.name == "d":
      data = path.read_bytes()
      at = data.find(raw)
      if at >= 0:
        garbage = np.random.RandomState(0).bytes(len(raw) // 2)
        path.write_bytes(data[:at + len(raw) // 4] + garbage + data[at + len(raw) // 4 + len(garbage):])
        assert path.stat().st_size == len(data)
        return
  raise AssertionError(f"no data file under {step_dir} holds the array's bytes raw")


def _largest(params):
  return max(jax.tree_util.tree_leaves(params), key=lambda x: x.size)


def _saved(tmp_path, tiny_t5, steps=(10, 20), data=False):
  run = tmp_path / "run"
  manager = checkpoints.CheckpointManager(str(run), async_save=False)
  stream = iter(tf.data.Dataset.range(100))
  states = {}
  for seed, step in enumerate(steps, start=1):
    states[step] = _incompressible(tiny_state(tiny_t5.module, seed=seed))
    for _ in range(step - (steps[steps.index(step) - 1] if steps.index(step) else 0)):
      next(stream)
    manager.save(step, states[step], stream if data else None)
  manager.close()
  return run, states


def test_every_step_records_a_checksum_of_each_array_and_of_its_data_position(tmp_path, tiny_t5):
  run, states = _saved(tmp_path, tiny_t5, data=True)
  import json
  recorded = json.loads((run / "checkpoints" / "20" / "checksums" / "metadata").read_text())
  names = {checkpoints._key_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(states[20])[0]}
  assert set(recorded["arrays"]) == names and "params/encoder/layers_0/mlp/wi/kernel" in names
  assert recorded["arrays"] != json.loads((run / "checkpoints" / "10" / "checksums" / "metadata").read_text())["arrays"]
  listing = json.loads((run / "checkpoints_data" / "20" / "process_0.checksums.json").read_text())["files"]
  assert sorted(listing) == sorted(p.name for p in (run / "checkpoints_data" / "20").iterdir()
                                   if not p.name.endswith(".checksums.json"))


def test_a_verified_checkpoint_restores_bit_identically(tmp_path, tiny_t5, caplog):
  run, states = _saved(tmp_path, tiny_t5, data=True)
  fresh = iter(tf.data.Dataset.range(100))
  manager = checkpoints.CheckpointManager(str(run))
  with caplog.at_level("INFO"):
    assert_trees_equal(manager.restore_latest(*on_one_device(states[20]), data_iterator=fresh), states[20])
  assert int(next(fresh)) == 20
  assert manager.last_verified_step() == 20
  assert any("step 20: every restored array matches its checksum" in r.getMessage() for r in caplog.records)
  params, step = checkpoints.restore_params(str(run), *on_one_device(states[20]["params"]))
  assert step == 20
  assert_trees_equal(params, states[20]["params"])


def test_garbage_inside_an_array_file_is_a_one_line_error_naming_the_step_and_the_array(tmp_path, tiny_t5):
  run, states = _saved(tmp_path, tiny_t5)
  _flip_bytes(run / "checkpoints" / "20" / "state", _largest(states[20]["params"]))
  # orbax alone reads the garbage as numbers: this is what the checksums are for.
  import orbax.checkpoint as ocp
  plain = ocp.CheckpointManager(str(run / "checkpoints"), item_handlers={"state": ocp.StandardCheckpointHandler()})
  target = jax.eval_shape(lambda t: t, states[20])
  read = plain.restore(20, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(read)),
                                                       jax.tree_util.tree_leaves(jax.device_get(states[20]))))
  plain.close()
  manager = checkpoints.CheckpointManager(str(run))
  with pytest.raises(checkpoints.UnreadableCheckpointError) as info:
    manager.restore_latest(*on_one_device(states[20]))
  message = str(info.value)
  assert "\n" not in message and (info.value.step, info.value.path) == (20, f"{run}/checkpoints/20")
  assert re.fullmatch(rf"checkpoint step 20 at {run}/checkpoints/20 cannot be read \(array params/\S+ does not match "
                      r"its checksum: the file holding it was changed or damaged\)", message), message
  # The params-only restore of topk-eval, topk-decode and topk-sparsity stops with the same line.
  with pytest.raises(checkpoints.UnreadableCheckpointError) as info:
    checkpoints.restore_params(str(run), *on_one_device(states[20]["params"]))
  assert str(info.value) == message
  # skip_unreadable goes back to the newest step that verifies, and sets the damaged one aside.
  restored = manager.restore_latest(*on_one_device(states[20]), skip_unreadable=True)
  assert_trees_equal(restored, states[10])
  assert manager.all_steps() == [10] and (run / "checkpoints_unreadable" / "20").is_dir()
  assert manager.last_verified_step() == 10


def test_load_run_stops_on_a_damaged_checkpoint(tmp_path, tiny_t5):
  from topk_transformers import runs

  run, states = _saved(tmp_path, tiny_t5)
  _flip_bytes(run / "checkpoints" / "20" / "state", _largest(states[20]["params"]))
  shapes = {"encoder_input_tokens": (2, 4), "decoder_input_tokens": (2, 4), "decoder_target_tokens": (2, 4)}
  with pytest.raises(checkpoints.CheckpointError, match=r"^checkpoint step 20 at .* does not match its checksum"):
    runs.load_run(str(run), model=tiny_t5, input_shapes=shapes)


def test_a_truncated_or_missing_data_position_file_is_unreadable_and_skipped(tmp_path, tiny_t5):
  run, states = _saved(tmp_path, tiny_t5, data=True)
  data_file = next((run / "checkpoints_data" / "20").glob("process_0.data-*"))
  size = data_file.stat().st_size
  with open(data_file, "r+b") as f:
    f.truncate(size // 2)
  manager = checkpoints.CheckpointManager(str(run))
  with pytest.raises(checkpoints.UnreadableCheckpointError) as info:
    manager.restore_latest(*on_one_device(states[20]), data_iterator=iter(tf.data.Dataset.range(100)))
  assert str(info.value) == (f"checkpoint step 20 at {run}/checkpoints/20 cannot be read (its data position: "
                             f"{data_file} has {size // 2} bytes, {size} were written)")
  fresh = iter(tf.data.Dataset.range(100))
  assert_trees_equal(manager.restore_latest(*on_one_device(states[20]), data_iterator=fresh, skip_unreadable=True),
                     states[10])
  assert int(next(fresh)) == 10
  assert (run / "checkpoints_unreadable" / "data" / "20").is_dir()
  os.remove(next((run / "checkpoints_data" / "10").glob("process_0.index")))
  with pytest.raises(checkpoints.UnreadableCheckpointError, match=r"its data position: .*process_0.index is missing"):
    manager.restore_latest(*on_one_device(states[10]), data_iterator=iter(tf.data.Dataset.range(100)))


def test_a_nonfinite_parameter_after_a_restore_is_an_error(tmp_path, state):
  run = tmp_path / "run"
  bad = {**state, "params": jax.tree_util.tree_map(lambda x: x, state["params"])}
  bad["params"]["decoder"]["layers_0"]["mlp"]["wo"]["kernel"] = (
      bad["params"]["decoder"]["layers_0"]["mlp"]["wo"]["kernel"].at[0, 0].set(jnp.nan))
  manager = checkpoints.CheckpointManager(str(run), async_save=False)
  manager.save(4, bad)
  expected = (f"checkpoint step 4 at {run}/checkpoints/4 cannot be read (array params/decoder/layers_0/mlp/wo/kernel "
              "holds NaN or inf)")
  with pytest.raises(checkpoints.UnreadableCheckpointError) as info:
    manager.restore_latest(*on_one_device(state))
  assert str(info.value) == expected
  with pytest.raises(checkpoints.UnreadableCheckpointError) as info:
    checkpoints.restore_params(str(run), *on_one_device(state["params"]))
  assert str(info.value) == expected


def test_a_checkpoint_without_checksums_restores_unverified_with_one_log_line(tmp_path, tiny_t5, caplog):
  import shutil

  run, states = _saved(tmp_path, tiny_t5, data=True)
  shutil.rmtree(run / "checkpoints" / "20" / "checksums")  # as written before checksums were recorded
  os.remove(run / "checkpoints_data" / "20" / "process_0.checksums.json")
  manager = checkpoints.CheckpointManager(str(run))
  fresh = iter(tf.data.Dataset.range(100))
  with caplog.at_level("INFO"):
    assert_trees_equal(manager.restore_latest(*on_one_device(states[20]), data_iterator=fresh), states[20])
    params, _ = checkpoints.restore_params(str(run), *on_one_device(states[20]["params"]))
  assert int(next(fresh)) == 20
  assert_trees_equal(params, states[20]["params"])
  messages = [r.getMessage() for r in caplog.records]
  unverified = f"checkpoint step 20 at {run}/checkpoints/20 has no checksums (written before they were recorded): "
  assert sum(m.startswith(unverified) for m in messages) == 2, messages
  assert "the data position of step 20 has no checksums (written before they were recorded): restored unverified" \
      in messages
  assert manager.last_verified_step() is None


def test_decode_command_stops_on_a_damaged_checkpoint_with_one_line_and_exit_1(tmp_path, capsys):
  from topk_transformers import gin_utils  # pylint: disable=g-import-not-at-top
  from topk_transformers.commands import decode as decode_command  # pylint: disable=g-import-not-at-top

  gin_file = tmp_path / "bytes.gin"  # the tiny T5 with a byte vocabulary: nothing to train or download
  gin_file.write_text("from __gin__ import dynamic_registration\nimport seqio\n"
                      "include 't5/t5_1_0/tiny.gin'\nVOCABULARY = @seqio.ByteVocabulary()\n")
  flags = [f"--gin_file={gin_file}", "--gin.NUM_EMBEDDINGS=384", "--gin.TOP_K=32"]
  gin_utils.configure(*gin_utils.parse_gin_flags(flags)[:2])
  module = gin_utils.get_macro("MODEL").module
  ones = jnp.ones((1, 4), jnp.int32)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), ones, ones, ones, enable_dropout=False))["params"]
  state = _incompressible({"params": params, "step": jnp.asarray(0)})
  manager = checkpoints.CheckpointManager(str(tmp_path / "run"), async_save=False)
  manager.save(5, state)
  manager.close()
  _flip_bytes(tmp_path / "run" / "checkpoints" / "5" / "state", _largest(state["params"]))
  assert decode_command.main([*flags, f"--checkpoint={tmp_path / 'run'}", "--input", "hello",
                              "--max_decode_length=4"]) == 1
  gin.clear_config()
  captured = capsys.readouterr()
  lines = [line for line in captured.err.splitlines() if line.startswith("error:") or "Traceback" in line]
  assert len(lines) == 1 and re.fullmatch(rf"error: checkpoint step 5 at {tmp_path}/run/checkpoints/5 cannot be read "
                                          r"\(array params/\S+ does not match its checksum: .*\)", lines[0]), lines
  assert "score" not in captured.out


_SHARDED = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from topk_transformers import checkpoints

devices = np.array(jax.devices()).reshape(2, 2)
mesh = Mesh(devices, ("data", "model"))
x = jax.random.normal(jax.random.PRNGKey(0), (8, 16)).astype(jnp.bfloat16)
state = {"w": jax.device_put(x, NamedSharding(mesh, P("data", "model"))), "b": jnp.arange(5, dtype=jnp.int32)}
manager = checkpoints.CheckpointManager(sys.argv[1], async_save=False)
manager.save(1, state)
# Restored on another mesh: same checksums, so it verifies; one device: the same.
other = {"w": NamedSharding(mesh, P("model", None)), "b": NamedSharding(mesh, P())}
restored = manager.restore_latest(jax.eval_shape(lambda t: t, state), other)
assert restored["w"].sharding.spec == P("model", None)
one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
assert checkpoints.fingerprints(state) == checkpoints.fingerprints(jax.device_put(state, one))
changed = dict(state, w=state["w"].at[3, 5].add(1))
assert checkpoints.fingerprints(changed)["w"]["checksum"] != checkpoints.fingerprints(state)["w"]["checksum"]
print("ok", manager.last_verified_step())
"""


def test_checksums_do_not_depend_on_the_sharding(tmp_path):
  import subprocess
  import sys

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "run")], env=env, capture_output=True,
                        text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[-2:] == ["ok", "1"]


# ---- the commands end with exactly one line when a checkpoint cannot be used

_RUN_COMMAND = "import sys; from topk_transformers.commands.{0} import main; sys.exit(main())"


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
  """``(gin flags, run dir)``: a one-layer tiny T5 with a byte vocabulary, its params at step 3."""
  from topk_transformers import gin_utils  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("byte_run")
  gin_file = root / "bytes.gin"
  gin_file.write_text("from __gin__ import dynamic_registration\nimport seqio\ninclude 't5/t5_1_0/tiny.gin'\n"
                      "VOCABULARY = @seqio.ByteVocabulary()\nTASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 8}\n")
  flags = [f"--gin_file={gin_file}", "--gin.NUM_EMBEDDINGS=384", "--gin.TOP_K=32",
           "--gin.network.T5Config.num_encoder_layers=1", "--gin.network.T5Config.num_decoder_layers=1"]
  from topk_transformers import gin_utils  # pylint: disable=g-import-not-at-top,reimported
  gin_utils.configure(*gin_utils.parse_gin_flags(flags)[:2])
  module = gin_utils.get_macro("MODEL").module
  ones = jnp.ones((1, 4), jnp.int32)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), ones, ones, ones, enable_dropout=False))["params"]
  manager = checkpoints.CheckpointManager(str(root / "run"), async_save=False)
  manager.save(3, {"params": params, "step": 0})
  manager.close()
  gin.clear_config()
  return flags, root / "run"


def _remove_array_files(run):
  for path in (run / "checkpoints" / "3" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.unlink()


@pytest.mark.parametrize("damage, flags, message", [
    (None, ["--gin.network.T5Config.num_decoder_layers=2"],
     r"\(a different model: missing parameter 'params/decoder/layers_1/\S+' \(13 missing, 0 unexpected\)\)"),
    (None, ["--gin.network.T5Config.emb_dim=32"],
     r"\(a different model: 'params/\S+' has shape \(64,\) there but \(32,\) in this model\)"),
    (_remove_array_files, [],
     r"\((metadata: )?ValueError: [A-Z_]+: Error .*\)"),  # TensorStore's own line: which file, what is wrong
    (lambda run: (run / "checkpoints" / "3" / "state" / "_METADATA").unlink(), [],
     r"\(no array metadata found: its files are missing or damaged\)"),
], ids=["more_layers", "another_width", "array_files_removed", "metadata_removed"])
def test_topk_decode_stderr_is_exactly_one_line_for_a_checkpoint_it_cannot_use(byte_run, tmp_path, damage, flags,
                                                                                message):
  """No traceback, no orbax warnings about its read-only manager, no TensorStore spec, no event-loop noise."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  base_flags, run = byte_run
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  if damage:
    damage(copy)
  done = subprocess.run([sys.executable, "-c", _RUN_COMMAND.format("decode"), *base_flags, *flags,
                         f"--checkpoint={copy}", "--input", "hello", "--max_decode_length=4"],
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 1, done.stderr[-3000:]
  lines = done.stderr.splitlines()
  assert len(lines) == 1, done.stderr[-3000:]
  assert re.fullmatch(rf"error: cannot restore parameters from step 3 in {copy}/checkpoints {message}", lines[0]), lines
  assert "TensorStore" not in lines[0]


_NOISE = """
import sys, threading
from topk_transformers.commands import common

class Closed:
  def __del__(self):
    raise RuntimeError("Event loop is closed")   # as TensorStore reports it, through PyErr_WriteUnraisable

class Other:
  def __del__(self):
    raise RuntimeError("another problem")

@common.command(tensorflow=False)
def main(argv):
  Closed()
  sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)  # through PyErr_Print
  worker = threading.Thread(target=lambda: (_ for _ in ()).throw(RuntimeError("Event loop is closed")))
  worker.start(); worker.join()
  Other()
  raise common.CommandFailed("the checkpoint cannot be read")

sys.exit(main([]))
"""


def test_closed_event_loop_errors_are_dropped_and_other_errors_kept(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  done = subprocess.run([sys.executable, "-c", _NOISE], capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 1
  assert "Event loop is closed" not in done.stderr
  assert "RuntimeError: another problem" in done.stderr  # every other error still reaches its hook
  assert done.stderr.splitlines()[-1] == "error: the checkpoint cannot be read"


def test_a_converted_project_checkpoint_records_checksums_and_restores_verified(tmp_path, tiny_t5_config, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  from topk_transformers.t5 import convert  # pylint: disable=g-import-not-at-top

  config = tiny_t5_config()
  params = _incompressible({"params": tiny_state(network.Transformer(config))["params"]})["params"]
  run = tmp_path / "converted"
  convert.save_project(config, params, str(run))
  recorded = json.loads((run / "checkpoints" / "0" / "checksums" / "metadata").read_text())
  assert recorded["arrays"] == {name: {k: v for k, v in f.items() if k != "finite"}
                                for name, f in checkpoints.fingerprints({"params": params}).items()}
  with caplog.at_level(logging.INFO):
    restored, step = checkpoints.restore_params(str(run), *on_one_device(params))
  assert step == 0 and "checkpoint step 0: every restored array matches its checksum" in caplog.text
  assert_trees_equal(jax.device_get(restored), jax.device_get(params))
  _flip_bytes(run / "checkpoints" / "0" / "state", _largest(params))
  with pytest.raises(checkpoints.UnreadableCheckpointError, match=r"array params/\S+ does not match its checksum"):
    checkpoints.restore_params(str(run), *on_one_device(params))
