"""checkpoints: save and restore of the train state and data position, keep-N pruning, params-only restore, and the
one-line errors for a checkpoint that is missing or of another model.

Unreadable checkpoints (truncated files, ``skip_unreadable``) are exercised through the trainer in test_bad_inputs.py.
"""

import os

import flax.linen as nn
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
