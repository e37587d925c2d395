"""The one way to load a run: gin files + bindings + a checkpoint -> model, params on the mesh, dataset, partitioner.

Every consumer calls :func:`load_run`: ``topk-eval``, ``topk-sparsity``,
``topk-decode``, the benchmarks and the experiments. The trainer shares its
pieces (:func:`check_batch_size`, :func:`abstract_params`) for its own restore,
which also brings back the optimizer state and the data position::

  run = runs.load_run('/tmp/topk_t5_smoke', gin_files=['t5/runs/cpu_smoke.gin'])
  evals = evaluators.for_run(run, evaluators.DEFAULT, 'validation', eval_steps=10)
  results = evaluators.run_all(evals, run.params)      # {'loss': ..., 'sparsity/encoder/layers_0': ...}
  init = run.with_params(runs.INIT)                    # same model and shapes, the step-0 params

``checkpoint`` is a run directory (its newest step), one step's directory
(``RUN/checkpoints/<step>``), or ``'init'``: the parameters the trainer starts
from for the run's seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax

from topk_transformers import checkpoints, eval_loop, gin_utils, partitioning
from topk_transformers.gin_utils import ConfigError

INIT = "init"
DEFAULT_BATCH_SIZE = 8


@dataclasses.dataclass
class Run:
  """A model with its params placed on the mesh, and what it takes to feed it batches."""

  model: Any
  """The ``models.BaseModel`` (gin's ``MODEL``)."""
  params: Any
  """The params, placed with ``params_shardings``."""
  step: int
  """The checkpoint's step (0 for ``'init'``)."""
  dataset: Any
  """The run's dataset (gin's ``train.train.dataset``); ``None`` when the caller gave input shapes instead."""
  partitioner: partitioning.Partitioner
  batch_size: int
  """The global batch size, a multiple of the data-parallel size."""
  input_shapes: Dict[str, Tuple[int, ...]]
  params_shardings: Any
  batch_shardings: Dict[str, Any]
  checkpoint: str = INIT
  seed: int = 0
  # [(model, its jitted eval step)]: the list is shared by the runs with_params derives, so that whichever
  # compiles first compiles for all of them; a run with another model (dataclasses.replace) compiles its own.
  _eval_steps: list = dataclasses.field(default_factory=list, repr=False)

  @property
  def host_batch(self) -> int:
    return self.batch_size // jax.process_count()

  def eval_step(self) -> Callable:
    """The jitted eval step, compiled once and shared by the runs :meth:`with_params` derives."""
    for model, step in self._eval_steps:
      if model is self.model:
        return step
    step = eval_loop.make_eval_step(self.model, self.params_shardings, self.batch_shardings)
    self._eval_steps.append((self.model, step))
    return step

  def eval_loop(self, split: Optional[str] = None, eval_steps: Optional[int] = None) -> eval_loop.EvalLoop:
    """The pass of these runs' eval over (the first ``eval_steps`` batches of) ``split`` (default: the eval split),
    which the evaluators built on it share (``evaluators.for_run``)."""
    if self.dataset is None:
      raise ValueError("this run was loaded without a dataset (input_shapes were given)")
    return eval_loop.EvalLoop(model=self.model, dataset=self.dataset, split=split or self.dataset.eval_split,
                              batch_size=self.batch_size, partitioner=self.partitioner, eval_step=self.eval_step(),
                              batch_shardings=self.batch_shardings, eval_steps=eval_steps, seed=self.seed)

  def with_params(self, checkpoint: str) -> "Run":
    """This run with the params of another checkpoint of the same model, or ``'init'``."""
    if checkpoint == INIT:
      params = jax.device_put(init_params(self.model, self.input_shapes, self.seed), self.params_shardings)
      return dataclasses.replace(self, params=params, step=0, checkpoint=INIT)
    abstract = jax.eval_shape(lambda p: p, self.params)
    params, step = checkpoints.restore_params(checkpoint, abstract, self.params_shardings)
    return dataclasses.replace(self, params=params, step=int(step), checkpoint=checkpoint)


def check_batch_size(batch_size: int, partitioner: partitioning.Partitioner) -> None:
  """A global batch must split evenly over the hosts and the data-parallel devices."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ConfigError(f"batch_size must be a positive integer, got batch_size={batch_size!r}")
  _, num_hosts = partitioner.host_shard_info()
  dp = partitioner.data_parallel_size
  if batch_size % num_hosts or batch_size % dp:
    raise ConfigError(f"batch_size={batch_size} must divide over {num_hosts} hosts and {dp} data-parallel devices")


def input_shapes_of(dataset: Any, split: str, batch_size: int) -> Dict[str, Tuple[int, ...]]:
  """Global shapes of ``dataset``'s batches (the host pipeline's element spec, with the global batch)."""
  host_batch = batch_size // jax.process_count()
  spec = dataset.get_dataset(split, host_batch, shuffle=False, repeat=False).element_spec
  return {k: (batch_size,) + tuple(v.shape[1:]) for k, v in spec.items()}


def abstract_params(model: Any, input_shapes: Mapping[str, Tuple[int, ...]],
                    partitioner: partitioning.Partitioner) -> Tuple[Any, Any]:
  """``(params as ShapeDtypeStructs, their shardings from the logical axes)``; nothing is computed."""
  boxed = jax.eval_shape(lambda r: model.get_initial_variables(r, input_shapes), jax.random.PRNGKey(0))["params"]
  return nn.meta.unbox(boxed), partitioner.logical_shardings(boxed)


def init_rng(seed: int) -> jax.Array:
  """The key the trainer initialises params with for ``seed`` (the other half seeds dropout)."""
  return jax.random.split(jax.random.PRNGKey(seed))[0]


def init_params(model: Any, input_shapes: Mapping[str, Tuple[int, ...]], seed: int = 0) -> Any:
  """The trainer's step-0 params for ``seed``."""
  variables = jax.jit(lambda r: model.get_initial_variables(r, input_shapes))(init_rng(seed))
  return nn.meta.unbox(variables["params"])


def build_from_gin(binding: str, default: Any = gin.REQUIRED) -> Any:
  """Builds the object bound to a gin parameter such as ``train.train.dataset``."""
  try:
    value = gin.query_parameter(binding)
  except ValueError:
    if default is not gin.REQUIRED:
      return default
    raise ConfigError(f"{binding} is not bound: give the run's gin file") from None
  try:
    return gin_utils.build(value)
  except ConfigError:
    raise
  except Exception as e:  # gin wraps what the configurable raised
    raise ConfigError(f"building {binding}: {gin_utils.one_line(e)}") from None


def load_run(checkpoint: str = INIT, *, gin_files: Optional[Sequence[str]] = None, bindings: Sequence[str] = (),
             batch_size: Optional[int] = None, seed: Optional[int] = None, model: Any = None, dataset: Any = None,
             input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
             partitioner: Optional[partitioning.Partitioner] = None) -> Run:
  """Loads ``checkpoint`` of the run that the gin configuration describes.

  Args:
    checkpoint: a run directory, ``RUN/checkpoints/<step>`` or ``'init'``.
    gin_files, bindings: the run's gin files and bindings; ``None`` keeps gin's current configuration.
    batch_size: the global batch (default: gin's ``BATCH_SIZE``, else 8). It must divide over the
      data-parallel devices: a batch that does not is an error, not a silent rounding.
    seed: the seed of ``'init'`` params (default: ``train.train.seed``, else 0).
    model, dataset: instead of gin's ``MODEL`` and ``train.train.dataset``. Given a model and no gin
      files, gin is not read at all (partitioner, batch size and seed take their defaults).
    input_shapes: global batch shapes to build the model for; with them, no dataset is built
      unless ``dataset`` is given (``topk-decode`` needs none).
    partitioner: the mesh (default: gin's ``train.train.partitioner``, else all devices data-parallel).

  Raises:
    ConfigError: a bad configuration or batch size.
    checkpoints.CheckpointError: no checkpoint there, or one of another model.
  """
  if gin_files is not None:
    gin_utils.configure(gin_files, bindings)
  ckpt_dir = checkpoints.locate(checkpoint)[0] if checkpoint != INIT else None  # missing: found before any data
  # A caller that hands over the model (and no gin files) sets up the rest itself: gin is not read.
  from_gin = model is None or gin_files is not None
  model = gin_utils.get_macro("MODEL") if model is None else model
  if ckpt_dir is not None:
    model.check_checkpoint(ckpt_dir)  # a checkpoint of another model: one line, before any data is built
  if dataset is None and input_shapes is None:
    dataset = build_from_gin("train.train.dataset")
  if partitioner is None:
    # The run's own mesh when its gin files set one (NUM_PARTITIONS), else every device data-parallel.
    partitioner = (build_from_gin("train.train.partitioner", default=None) if from_gin else None
                   ) or partitioning.Partitioner()
  if batch_size is None:
    if input_shapes:
      batch_size = int(next(iter(input_shapes.values()))[0])
    else:
      batch_size = gin_utils.get_macro("BATCH_SIZE", default=DEFAULT_BATCH_SIZE) if from_gin else DEFAULT_BATCH_SIZE
  check_batch_size(batch_size, partitioner)
  if input_shapes is None:
    input_shapes = input_shapes_of(dataset, dataset.eval_split, batch_size)
  input_shapes = {k: tuple(v) for k, v in input_shapes.items()}
  abstract, params_shardings = abstract_params(model, input_shapes, partitioner)
  if seed is None:
    seed = int(build_from_gin("train.train.seed", default=0)) if from_gin else 0
  if checkpoint == INIT:
    params, step = jax.device_put(init_params(model, input_shapes, seed), params_shardings), 0
  else:
    params, step = checkpoints.restore_params(checkpoint, abstract, params_shardings)
  batch_shardings = {k: partitioner.data_sharding(len(s)) for k, s in input_shapes.items()}
  return Run(model=model, params=params, step=int(step), dataset=dataset, partitioner=partitioner,
             batch_size=batch_size, input_shapes=input_shapes, params_shardings=params_shardings,
             batch_shardings=batch_shardings, checkpoint=checkpoint, seed=seed)
