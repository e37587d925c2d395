"""runs.py: the one run loader (init and checkpoints), with_params, and its one-line errors."""

import os

import jax
import numpy as np
import optax
import pytest

from topk_transformers import checkpoints, partitioning, runs, train
from topk_transformers.errors import ConfigError
from conftest import assert_trees_equal
from toy import ToyDataset, ToyModel, ToyNet

BATCH = 32


def _load(checkpoint=runs.INIT, **kw):
  return runs.load_run(checkpoint, model=ToyModel(ToyNet(top_k=8)), dataset=ToyDataset(), **{"batch_size": BATCH,
                                                                                              **kw})


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step toy run with checkpoints at steps 2 and 4."""
  model_dir = tmp_path_factory.mktemp("run")
  result = train.train(model=ToyModel(ToyNet(top_k=8)), dataset=ToyDataset(), model_dir=str(model_dir),
                       train_steps=4, batch_size=BATCH, optimizer=optax.adam, learning_rate=lambda s: 1e-2,
                       eval_period=0, log_period=2, checkpoint_period=2, keep_checkpoints=None)
  return str(model_dir), result


def test_init_is_the_trainers_step_0_params_for_the_seed(tmp_path):
  # A run of 0 steps saves the params it starts from.
  train.train(model=ToyModel(ToyNet(top_k=8)), dataset=ToyDataset(), model_dir=str(tmp_path), train_steps=0,
              batch_size=BATCH, optimizer=optax.adam, learning_rate=lambda s: 1e-2, eval_period=0, seed=3)
  init = _load(seed=3)
  assert (init.step, init.checkpoint, init.batch_size) == (0, runs.INIT, BATCH)
  assert init.input_shapes == {"x": (BATCH, 8), "y": (BATCH,), "step": (BATCH,)}
  assert_trees_equal(init.params, _load(str(tmp_path)).params)
  other_seed = _load(seed=4).params
  assert not np.array_equal(_host(other_seed)["embed"]["kernel"], _host(init.params)["embed"]["kernel"])


def test_a_run_directory_loads_its_newest_step_and_a_step_directory_that_step(trained):
  model_dir, result = trained
  newest = _load(model_dir)
  assert newest.step == 4
  assert_trees_equal(newest.params, result.state.params)
  step2 = _load(os.path.join(model_dir, "checkpoints", "2"))
  assert step2.step == 2
  assert not np.array_equal(_host(step2.params)["head"]["kernel"], _host(newest.params)["head"]["kernel"])


def test_with_params_swaps_only_the_params(trained):
  model_dir, _ = trained
  newest = _load(model_dir)
  step2 = newest.with_params(os.path.join(model_dir, "checkpoints", "2"))
  assert (step2.step, step2.model, step2.input_shapes) == (2, newest.model, newest.input_shapes)
  assert_trees_equal(step2.params, _load(os.path.join(model_dir, "checkpoints", "2")).params)
  assert step2.eval_step() is newest.eval_step()  # compiled once for the run and the runs derived from it
  init = newest.with_params(runs.INIT)
  assert (init.step, init.checkpoint) == (0, runs.INIT)
  assert_trees_equal(init.params, _load().params)


def test_a_missing_checkpoint_is_one_line_before_any_data_is_built(tmp_path):
  class NoData(ToyDataset):
    def get_dataset(self, *a, **kw):
      raise AssertionError("the dataset was built before the checkpoint was found")

  with pytest.raises(checkpoints.CheckpointError) as err:
    runs.load_run(str(tmp_path / "nowhere"), model=ToyModel(), dataset=NoData(), batch_size=BATCH)
  assert "no checkpoint at" in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_of_another_model_is_one_line(trained):
  model_dir, _ = trained
  with pytest.raises(checkpoints.CheckpointError, match="cannot restore parameters from step 4") as err:
    runs.load_run(model_dir, model=ToyModel(ToyNet(top_k=8, hidden=32)), dataset=ToyDataset(), batch_size=BATCH)
  assert "\n" not in str(err.value)


class _TwoWayData(partitioning.Partitioner):
  """A mesh with two data-parallel devices on one host, as far as the batch-size check can tell."""

  def __init__(self):  # pylint: disable=super-init-not-called
    pass

  data_parallel_size = 2

  def host_shard_info(self):
    return 0, 1


@pytest.mark.parametrize("batch_size, message", [
    (3, "batch_size=3 must divide over 1 hosts and 2 data-parallel devices"),
    (0, "batch_size must be a positive integer, got batch_size=0"),
    (True, "batch_size must be a positive integer, got batch_size=True"),
    (2.0, "batch_size must be a positive integer, got batch_size=2.0"),
])
def test_a_batch_that_does_not_split_over_the_mesh_is_one_line(batch_size, message):
  with pytest.raises(ConfigError, match=message):
    runs.check_batch_size(batch_size, _TwoWayData())
  runs.check_batch_size(4, _TwoWayData())  # a multiple passes


def test_load_run_checks_the_batch_size_against_its_partitioner():
  with pytest.raises(ConfigError, match="batch_size=3 must divide"):
    _load(batch_size=3, partitioner=_TwoWayData())
