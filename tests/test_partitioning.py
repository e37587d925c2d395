"""partitioning: T5X's logical-axis rules, the mesh a Partitioner builds, the shardings it gives parameters and
batches, and the one-line errors for a mesh or batch that does not fit the devices.

The in-process tests see one CPU device; one subprocess with 8 host devices checks the shapes of real meshes.
Training on a 4x2 mesh against one device is in test_sharding.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from topk_transformers import partitioning, runs
from topk_transformers.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_standard_rules_put_model_parallel_axes_on_model_and_the_batch_on_data():
  rules = dict(partitioning.standard_logical_axis_rules())
  assert rules["batch"] == "data"
  assert [name for name, axis in rules.items() if axis == "model"] == ["vocab", "mlp", "heads", "joined_kv"]
  assert rules["embed"] is None and rules["kv"] is None and rules["length"] is None
  assert dict(partitioning.standard_logical_axis_rules("2d"))["embed"] == "data"


def test_an_unknown_parameter_sharding_is_a_one_line_error():
  with pytest.raises(ConfigError, match=r"^parameter_sharding must be '1d' or '2d', got '3d'$"):
    partitioning.Partitioner(parameter_sharding="3d")


def test_logical_axes_become_partition_specs(tiny_t5):
  tokens = np.ones((2, 4), np.int32)
  boxed = jax.eval_shape(lambda: tiny_t5.module.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                                     enable_dropout=False))["params"]
  for mode, embed in (("1d", None), ("2d", "data")):
    shardings = partitioning.Partitioner(parameter_sharding=mode).logical_shardings(boxed)
    mlp = shardings["encoder"]["layers_0"]["mlp"]
    assert mlp["wi"]["kernel"].spec == P(embed, "model")  # (embed, mlp)
    assert mlp["wo"]["kernel"].spec == P("model", embed)  # (mlp, embed)
    assert shardings["token_embedder"]["embedding"].spec == P("model", embed)  # (vocab, embed)
    query = shardings["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert query.spec == P(embed, "model")  # (embed, joined_kv)


def test_plain_leaves_replicate_and_batches_split_over_data():
  part = partitioning.Partitioner()
  assert part.mesh.axis_names == ("data", "model") and dict(part.mesh.shape) == {"data": 1, "model": 1}
  assert part.logical_shardings({"w": np.zeros(3)})["w"].spec == P()
  assert part.replicated().spec == P()
  assert part.data_sharding(3).spec == P("data", None, None)
  batch = part.shard_batch({"x": np.arange(6).reshape(2, 3)})
  assert batch["x"].shape == (2, 3) and batch["x"].sharding.spec == P("data", None)
  assert part.host_shard_info() == (0, 1)


@pytest.mark.parametrize("kwargs, shown", [
    (dict(num_partitions=2), "num_partitions=2 does not divide the 1 devices"),
    (dict(num_partitions=0), "num_partitions=0 does not divide the 1 devices"),
    (dict(data_parallel_size=2), "data_parallel_size=2 x num_partitions=1 != 1 devices"),
])
def test_a_mesh_that_does_not_fit_the_devices_is_a_one_line_error(kwargs, shown):
  with pytest.raises(ConfigError) as info:
    partitioning.Partitioner(**kwargs)
  assert str(info.value) == shown


def test_the_batch_must_divide_over_hosts(monkeypatch):
  part = partitioning.Partitioner()
  runs.check_batch_size(3, part)
  monkeypatch.setattr(part, "host_shard_info", lambda: (0, 2))  # as the first of two hosts sees it
  with pytest.raises(ConfigError, match=r"^batch_size=3 must divide over 2 hosts and 1 data-parallel devices$"):
    runs.check_batch_size(3, part)
  runs.check_batch_size(4, part)
  for bad in (0, -8, 2.0, True):
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
      runs.check_batch_size(bad, part)


_EIGHT_DEVICES = textwrap.dedent(r"""
    import json, sys
    import jax, numpy as np
    from topk_transformers import partitioning, runs
    from topk_transformers.errors import ConfigError

    out = {}
    for n in (1, 2, 4, 8):
      part = partitioning.Partitioner(num_partitions=n)
      out[f"mesh_{n}"] = [part.data_parallel_size, part.num_partitions]
    part = partitioning.Partitioner(num_partitions=2)
    batch = part.shard_batch({"x": np.arange(16).reshape(8, 2)})
    out["batch_shard"] = list(batch["x"].addressable_shards[0].data.shape)
    out["errors"] = []
    for make in (lambda: partitioning.Partitioner(num_partitions=3),
                 lambda: partitioning.Partitioner(num_partitions=2, data_parallel_size=2),
                 lambda: runs.check_batch_size(6, part)):
      try:
        make()
        out["errors"].append(None)
      except ConfigError as e:
        out["errors"].append(str(e))
    runs.check_batch_size(12, part)
    print(json.dumps(out))
""")


def test_meshes_over_eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # num_partitions is the model axis; the data axis takes the rest of the devices.
  assert [out[f"mesh_{n}"] for n in (1, 2, 4, 8)] == [[8, 1], [4, 2], [2, 4], [1, 8]]
  assert out["batch_shard"] == [2, 2]  # 8 rows over 4 data-parallel groups
  assert out["errors"] == ["num_partitions=3 does not divide the 8 devices",
                           "data_parallel_size=2 x num_partitions=2 != 8 devices",
                           "batch_size=6 must divide over 1 hosts and 4 data-parallel devices"]
