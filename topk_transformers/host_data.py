"""This process's rows of every global training batch, read from the run's data shards.

A run's training stream is ``data_shards`` pipelines: shard ``j`` is
``dataset.get_dataset(split, batch_size // data_shards, shard_id=j, num_shards=data_shards, ...)`` (seqio's
``ShardInfo`` for Tasks, an index slice for the image pipelines). A global batch is shard 0's batch, then shard
1's, and so on; each process feeds the rows its devices hold (``Partitioner.host_rows``), which are whole
shards. So the global batches do not depend on how many processes read them: a run with ``data_shards=2``
trains on the same batches in 1 process or in 2, and its checkpointed data position (one per shard) resumes in
either. ``data_shards`` defaults to the process count of the run's first launch.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from topk_transformers.errors import ConfigError


def check_layout(global_batch: int, data_shards: int, rows: Tuple[int, int]) -> None:
  """A ``ConfigError`` unless ``data_shards`` divides the batch and this process's rows are whole shards."""
  if isinstance(data_shards, bool) or not isinstance(data_shards, int) or data_shards <= 0:
    raise ConfigError(f"data_shards must be a positive integer, got {data_shards!r}")
  if global_batch % data_shards:
    raise ConfigError(f"data_shards={data_shards} does not divide batch_size={global_batch}")
  per = global_batch // data_shards
  start, stop = rows
  if start % per or stop % per:
    raise ConfigError(f"this process feeds rows {start}-{stop - 1} of the global batch, which are not whole data "
                      f"shards of {per} rows (data_shards={data_shards}); use a data_shards that the process "
                      "count divides")


def fits(global_batch: int, data_shards: int, rows: Tuple[int, int]) -> bool:
  try:
    check_layout(global_batch, data_shards, rows)
  except ConfigError:
    return False
  return True


class HostBatches:
  """An iterator over this process's part of the global batches: its shards' batches, concatenated."""

  def __init__(self, dataset: Any, split: str, global_batch: int, data_shards: int, rows: Tuple[int, int],
               seed: int = 0):
    check_layout(global_batch, data_shards, rows)
    self.data_shards = data_shards
    per = global_batch // data_shards
    self.shards: List[int] = list(range(rows[0] // per, rows[1] // per))
    self.datasets = {j: dataset.get_dataset(split, per, shard_id=j, num_shards=data_shards, seed=seed, shuffle=True,
                                            repeat=True) for j in self.shards}
    self.iterators = {j: iter(ds) for j, ds in self.datasets.items()}

  @property
  def element_spec(self) -> Any:
    return self.datasets[self.shards[0]].element_spec

  def shard_iterators(self) -> Dict[int, Any]:
    """``{shard id: its tf.data iterator}``: what a checkpoint saves and restores, one position per shard."""
    return dict(self.iterators)

  def __iter__(self) -> "HostBatches":
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    parts = [next(self.iterators[j]) for j in self.shards]
    if len(parts) == 1:
      return {k: np.asarray(v) for k, v in parts[0].items()}
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
