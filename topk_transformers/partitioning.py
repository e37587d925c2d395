"""Device mesh and T5X logical-axis rules (JAX SPMD); ``distributed.py`` starts a multi-process run.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv``,
``joined_kv``, ``vocab``, ...). A :class:`Partitioner` builds a ``('data', 'model')``
mesh over every device of every host and maps those names onto it with T5X's
standard rules: model-parallel dimensions (``mlp``, ``heads``, ``joined_kv``,
``vocab``) go to ``model``, the batch goes to ``data``. With
``parameter_sharding='2d'`` the ``embed`` dimension of parameters also goes to
``data`` (fully sharded, ZeRO-3 style), for models too big to replicate.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from topk_transformers.gin_utils import ConfigError

Rules = Sequence[Tuple[str, Any]]


def standard_logical_axis_rules(parameter_sharding: str = "1d") -> Tuple[Tuple[str, Any], ...]:
  """T5X's default rules: 1-D model parallelism, data-parallel batch.

  ``parameter_sharding='2d'`` additionally shards parameters' ``embed`` axis over
  ``data`` so no device holds a full copy of the weights or optimizer state.
  """
  if parameter_sharding not in ("1d", "2d"):
    raise ConfigError(f"parameter_sharding must be '1d' or '2d', got {parameter_sharding!r}")
  rules = [
      ("batch", "data"),
      ("vocab", "model"),
      ("mlp", "model"),
      ("heads", "model"),
      ("joined_kv", "model"),
      ("kv", None),
      ("length", None),
      ("relpos_buckets", None),
      ("abspos_buckets", None),
      ("layers", None),
      ("stack", None),
      ("mlp_activations", None),
  ]
  rules.append(("embed", "data" if parameter_sharding == "2d" else None))
  return tuple(rules)


class Partitioner:
  """Owns the mesh and turns logical axis names into shardings.

  Args:
    num_partitions: model-parallel size (the ``model`` mesh axis); the ``data``
      axis takes the remaining devices. ``model_parallel_submesh`` is not needed:
      ``jax.make_mesh`` lays the axes out along the physical topology.
    data_parallel_size: if given, must equal ``device_count // num_partitions``.
    parameter_sharding: ``'1d'`` (T5X default) or ``'2d'`` (also shard ``embed`` over ``data``).
    logical_axis_rules: overrides the standard rules entirely.
  """

  def __init__(
      self,
      num_partitions: int = 1,
      data_parallel_size: Optional[int] = None,
      parameter_sharding: str = "1d",
      logical_axis_rules: Optional[Rules] = None,
      devices: Optional[Sequence[jax.Device]] = None,
  ):
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if num_partitions <= 0 or n % num_partitions:
      raise ConfigError(f"num_partitions={num_partitions} does not divide the {n} devices")
    data = n // num_partitions
    if data_parallel_size is not None and data_parallel_size != data:
      raise ConfigError(
          f"data_parallel_size={data_parallel_size} x num_partitions={num_partitions} != {n} devices")
    # Auto axes: XLA's sharding propagation places activations, as in T5X (jax.make_mesh
    # defaults to Explicit axes, which would make every op's output sharding part of its type).
    auto = (jax.sharding.AxisType.Auto,) * 2
    self.mesh = jax.make_mesh((data, num_partitions), ("data", "model"), axis_types=auto, devices=devices)
    self.rules = tuple(logical_axis_rules) if logical_axis_rules is not None else standard_logical_axis_rules(
        parameter_sharding)

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape["data"]

  @property
  def num_partitions(self) -> int:
    return self.mesh.shape["model"]

  def logical_shardings(self, boxed_tree: Any) -> Any:
    """Shardings for a tree of ``nn.LogicallyPartitioned`` (or plain) leaves; plain leaves replicate."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def data_sharding(self, ndim: int) -> NamedSharding:
    """Batch-major arrays: first axis over ``data``."""
    return NamedSharding(self.mesh, P("data", *([None] * (ndim - 1))))

  def shard_batch(self, local_batch: dict) -> dict:
    """Per-host numpy batch -> global ``jax.Array`` sharded over ``data`` (multi-host aware)."""
    return {
        k: jax.make_array_from_process_local_data(self.data_sharding(np.ndim(v)), np.asarray(v))
        for k, v in local_batch.items()
    }

  def host_shard_info(self) -> Tuple[int, int]:
    """``(shard_id, num_shards)`` of this host's slice of the global batch."""
    return jax.process_index(), jax.process_count()

  def host_rows(self, global_batch: int) -> Tuple[int, int]:
    """``(start, stop)``: the rows of a global batch that this process's devices hold (and so must feed).

    The mesh decides it: a process owns the ``data`` positions of its devices. A process whose rows are not one
    contiguous block cannot feed them from one pipeline and is a ``ConfigError``.
    """
    indices = self.data_sharding(1).addressable_devices_indices_map((global_batch,))
    rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in indices.values()})
    start, stop = rows[0][0], rows[0][1]
    for a, b in rows[1:]:
      if a != stop:
        raise ConfigError(f"process {jax.process_index()} holds rows {rows} of the global batch, not one block; "
                          "use a mesh whose data axis keeps each process's devices together")
      stop = b
    return start, stop


def opt_state_shardings(opt_state_shapes: Any, params_shapes: Any, params_shardings: Any,
                        replicated: NamedSharding) -> Any:
  """Shardings for an optax state, following the parameters it mirrors.

  Every sub-tree of the optimizer state with the parameters' tree structure is
  matched leaf by leaf: a leaf of the parameter's shape takes its sharding;
  Adafactor's factored second moments (the parameter's shape without its last,
  or without its second-to-last axis) take the parameter's spec without that
  axis; anything else (step counts, unfactored dummies) is replicated.
  """
  params_struct = jax.tree_util.tree_structure(params_shapes)

  def like_param(leaf, pshape, psharding):
    shape, pshape = tuple(leaf.shape), tuple(pshape.shape)
    spec = tuple(psharding.spec) + (None,) * (len(pshape) - len(psharding.spec))
    if shape == pshape:
      return psharding
    if len(pshape) >= 2 and shape == pshape[:-1]:
      return NamedSharding(psharding.mesh, P(*spec[:-1]))
    if len(pshape) >= 2 and shape == pshape[:-2] + pshape[-1:]:
      return NamedSharding(psharding.mesh, P(*(spec[:-2] + spec[-1:])))
    return replicated

  def mirrors_params(node) -> bool:
    return jax.tree_util.tree_structure(node) == params_struct

  def assign(node):
    if mirrors_params(node):
      return jax.tree_util.tree_map(like_param, node, params_shapes, params_shardings)
    return replicated

  return jax.tree_util.tree_map(assign, opt_state_shapes, is_leaf=mirrors_params)
