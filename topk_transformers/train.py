"""The gin-configured training loop, shared by T5 and ViT.

One function, :func:`train`, configured from gin like T5X's ``train_script.train``:
a MODEL (``t5.model.EncoderDecoderModel`` or ``vit.model.ClassificationModel``),
a dataset (``data.seqio_input.SeqioDataset`` or ``data.vision.ImageDataset``), an
optax optimizer, a ``Partitioner`` (``('data', 'model')`` mesh, logical-axis rules).

What it does, in order: (multi-host set-up) -> mesh -> abstract init (shapes only) ->
shardings from the logical axes -> restore the latest checkpoint in ``model_dir`` or
initialise -> the jitted, sharded step in a loop with periodic metrics, evaluation and
checkpoints. A run that stops (SIGTERM, crash, end of a job) and is restarted on the
same ``model_dir`` continues where it was, data position included, and reaches the
same parameters as a run that never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf

from topk_transformers import checkpoints as ckpt_lib
from topk_transformers import distributed
from topk_transformers import eval_loop
from topk_transformers import evaluators as evaluators_lib
from topk_transformers import gin_utils
from topk_transformers import host_data
from topk_transformers import model_dir_lock
from topk_transformers import partitioning
from topk_transformers import runs
from topk_transformers import sparsity
from topk_transformers.gin_utils import ConfigError
from topk_transformers.metrics import MetricLogger


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # -1 while every step was finite; else the first step whose loss or gradients were not.
  nonfinite_step: jax.Array


class NonFiniteLossError(RuntimeError):
  pass


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Callable:
  """T5's schedule: ``base / sqrt(max(step, warmup_steps))`` (constant during warm-up)."""

  def schedule(step):
    return base_learning_rate / jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32), warmup_steps))

  return schedule


def warmup_cosine_schedule(peak_learning_rate: float = 1e-3, warmup_steps: int = 1000,
                           total_steps: int = 10_000, end_learning_rate: float = 0.0) -> Callable:
  """Linear warm-up then cosine decay (the ViT recipe)."""
  return optax.warmup_cosine_decay_schedule(0.0, peak_learning_rate, warmup_steps, max(total_steps, warmup_steps + 1),
                                            end_learning_rate)


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, weight_decay: float = 1e-4,
          grad_clip_norm: Optional[float] = 1.0) -> optax.GradientTransformation:
  """AdamW with optional global-norm clipping (the ViT recipe)."""
  tx = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx) if grad_clip_norm else tx


def _global_input_shapes(element_spec: Mapping[str, tf.TensorSpec], global_batch: int) -> Dict[str, tuple]:
  return {k: (global_batch,) + tuple(v.shape[1:]) for k, v in element_spec.items()}


def _mean_metrics(history):
  """Averages a list of per-step metric dicts (host numpy)."""
  keys = history[0].keys()
  return {k: float(np.mean([h[k] for h in history])) for k in keys}


class _Preemption:
  """SIGTERM (TPU preemption, job kill) or SIGINT (Ctrl-C) sets a flag; the loop checkpoints and exits.

  ``signal_name`` is the first of them received. A second Ctrl-C stops at once (``KeyboardInterrupt``),
  without the checkpoint.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name: Optional[str] = None
    self._previous: Dict[int, Any] = {}

  def __enter__(self):
    self._processes = jax.process_count()
    for signum in self.SIGNALS:
      if signum == signal.SIGTERM and self._processes > 1:
        continue  # jax.distributed's preemption notifier catches it, and the processes agree on the step
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    again = " (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else ""
    logging.warning("%s received: writing a checkpoint at the next step, then stopping%s.", name, again)
    self.signal_name = self.signal_name or name
    self.requested = True
    if self._processes > 1:  # the other processes must stop at the same step: tell the runtime as a SIGTERM
      os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      if previous is not None:
        signal.signal(signum, previous)

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after ``step``: in a multi-process run, at the step all processes agree on
    (the distributed runtime's preemption sync point), whichever of them got the signal."""
    if self._processes > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  train_metrics: Dict[str, float]
  eval_metrics: Dict[str, float]
  sparsity: Dict[str, float]
  preempted: bool = False
  # The signal that stopped a preempted run: 'SIGTERM' (also a pod's preemption notice) or 'SIGINT' (Ctrl-C).
  stop_signal: Optional[str] = None
  # (step, mean train metrics since the previous log step), for every log step of this process.
  log: list = dataclasses.field(default_factory=list)


def train(
    *,
    model: Any,
    dataset: Any,
    model_dir: str,
    train_steps: int,
    batch_size: int,
    optimizer: Callable[..., optax.GradientTransformation] = optax.adafactor,
    learning_rate: Callable = rsqrt_schedule(),
    partitioner: Optional[partitioning.Partitioner] = None,
    eval_period: int = 1000,
    eval_steps: Optional[int] = 20,
    log_period: int = 100,
    checkpoint_period: int = 1000,
    keep_checkpoints: Optional[int] = 3,
    seed: int = 0,
    data_shards: Optional[int] = None,
    end_of_training: Optional[Callable[..., None]] = None,
    resume_from_readable: bool = False,
    initial_checkpoint_path: Optional[str] = None,
    initial_checkpoint_format: str = "auto",
    evaluators: Optional[Sequence[Callable[..., Any]]] = None,
    config_text: Optional[str] = None,
) -> TrainResult:
  """Trains ``model`` on ``dataset`` for ``train_steps`` steps of global batch ``batch_size``.

  Args:
    model: the MODEL (``loss_fn``, ``eval_fn``, ``get_initial_variables``).
    dataset: ``get_dataset(split, batch_size, shard_id, num_shards, seed, shuffle, repeat)``
      with ``train_split``/``eval_split``.
    model_dir: checkpoints, TensorBoard events and ``config.gin`` go here; a run restarted
      on the same directory resumes.
    optimizer: called as ``optimizer(learning_rate=schedule)`` (gin: ``@optax.adafactor``).
    learning_rate: a schedule ``step -> lr``.
    partitioner: the mesh and axis rules (default: every device data-parallel).
    eval_period, eval_steps: evaluate on ``dataset.eval_split`` every ``eval_period`` steps
      for ``eval_steps`` batches (``None``: the whole split).
    log_period: metrics (TensorBoard + console, process 0) every ``log_period`` steps.
    data_shards: how many data pipelines make up a global batch (``host_data.py``); each process reads the shards
      of its rows. Default: what the checkpoint to resume was saved with, else the process count. A run keeps
      its data position across process counts that divide it.
    checkpoint_period, keep_checkpoints: orbax checkpoints every ``checkpoint_period`` steps,
      keeping the newest ``keep_checkpoints``; one is always written at the end.
    end_of_training: called as ``end_of_training(model=, params=, dataset=, partitioner=)``
      (e.g. decode a held-out example), on process 0's console.
    resume_from_readable: if the newest checkpoint cannot be read, resume from the newest one that can
      (params, optimizer state, data position) and move the unreadable newer ones to
      ``model_dir/checkpoints_unreadable/`` (nothing is deleted); by default that is an error.
    initial_checkpoint_path, initial_checkpoint_format: start from these params (a Hugging Face, T5X or
      project checkpoint, ``'hf'``/``'t5x'``/``'project'`` or ``'auto'``) with a fresh optimizer state at
      step 0, as T5X's ``initial_checkpoint_path``; only when ``model_dir`` holds no checkpoint to resume.
    evaluators: the evaluator classes run at every evaluation (gin: ``%EVALUATORS``; default
      ``evaluators.DEFAULT``: metrics, sparsity, calibration where the model has it), the list
      ``topk-eval`` runs too; the eval metrics are their numbers, ``sparsity/<layer>`` apart.
    config_text: written to ``model_dir/config.gin`` (``train_from_gin`` passes gin's configuration) once the
      run is accepted: model built, batch size checked, checkpoint restored or params initialised. A launch
      rejected before that changes nothing in ``model_dir``.
  """
  settings = dict(locals())
  if train_steps < 0:
    raise ConfigError(f"train_steps must be >= 0, got train_steps={train_steps}")
  check_model_dir(model_dir)
  distributed.initialize()  # a detected cluster; the commands start an explicit launch before gin builds anything
  # A second trainer on this MODEL_DIR stops here, before it reads or writes anything in it.
  with model_dir_lock.ModelDirLock(model_dir, jax.process_index()):
    return _train(**settings)


def _train(*, model, dataset, model_dir, train_steps, batch_size, optimizer, learning_rate, partitioner, eval_period,
           eval_steps, log_period, checkpoint_period, keep_checkpoints, seed, data_shards, end_of_training,
           resume_from_readable, initial_checkpoint_path, initial_checkpoint_format, evaluators,
           config_text) -> TrainResult:
  partitioner = partitioner or partitioning.Partitioner()
  runs.check_batch_size(batch_size, partitioner)
  manager = ckpt_lib.CheckpointManager(model_dir, keep=keep_checkpoints)

  # ---- data: this process's rows of each global batch, from whole data shards
  rows = partitioner.host_rows(batch_size)
  saved_shards = manager.data_shards()
  if data_shards is None:
    data_shards = saved_shards if saved_shards and host_data.fits(batch_size, saved_shards, rows) \
        else jax.process_count()
  train_iter = host_data.HostBatches(dataset, dataset.train_split, batch_size, data_shards, rows, seed=seed)
  input_shapes = _global_input_shapes(train_iter.element_spec, batch_size)

  # ---- abstract state and its shardings
  init_rng, dropout_base = jax.random.split(jax.random.PRNGKey(seed))  # runs.init_rng is the first half
  abstract_params, params_shardings = runs.abstract_params(model, input_shapes, partitioner)
  tx = optimizer(learning_rate=learning_rate)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = partitioning.opt_state_shardings(abstract_opt, abstract_params, params_shardings,
                                                   partitioner.replicated())
  state_shardings = TrainState(step=partitioner.replicated(), params=params_shardings, opt_state=opt_shardings,
                               nonfinite_step=partitioner.replicated())

  def init_state(init_rng):
    params = nn.meta.unbox(model.get_initial_variables(init_rng, input_shapes)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite_step=jnp.full((), -1, jnp.int32))

  abstract_state = jax.eval_shape(init_state, init_rng)
  try:
    restored = manager.restore_latest(abstract_state, state_shardings, train_iter,
                                      skip_unreadable=resume_from_readable)
  except ckpt_lib.UnreadableCheckpointError as e:
    if resume_from_readable:
      raise
    raise ckpt_lib.UnreadableCheckpointError(
        f"{e}; to resume from the newest readable checkpoint instead, run again with "
        f"--gin.train.train.resume_from_readable=True (it moves unreadable ones to {manager.unreadable_dir})",
        step=e.step, path=e.path) from None
  if restored is not None:
    state = restored
    logging.info("Restored step %d from %s", int(state.step), manager.directory)
  elif initial_checkpoint_path:
    params = model.load_initial_params(initial_checkpoint_path, initial_checkpoint_format, abstract_params,
                                       params_shardings)
    fresh = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                 nonfinite_step=jnp.full((), -1, jnp.int32))
    state = jax.jit(fresh, out_shardings=state_shardings)(params)
    logging.info("Initial params from %s; fresh optimizer state at step 0", initial_checkpoint_path)
  else:
    state = jax.jit(init_state, out_shardings=state_shardings)(init_rng)
  start_step = int(state.step)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params))
  logging.info("Model: %s parameters; mesh %s", f"{n_params:,}", dict(partitioner.mesh.shape))

  # ---- the step
  batch_shardings = {k: partitioner.data_sharding(len(s)) for k, s in input_shapes.items()}

  def train_step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(dropout_base, state.step)
    (loss, aux), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(state.params, batch, dropout_rng)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    # A non-finite step changes nothing: the last good parameters stay for the checkpoint.
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state), nonfinite_step=nonfinite_step)
    metrics = dict(aux["metrics"])
    metrics["learning_rate"] = jnp.asarray(learning_rate(state.step), jnp.float32)
    for name, pct in sparsity.percent_nonzero(aux["intermediates"]).items():
      metrics[f"sparsity/{name}"] = pct
    return new_state, metrics

  p_train_step = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))

  # The evaluators of every evaluation, sharing one pass over the eval split; those that measure only a
  # finished run (Table 1's corruptions) are left to topk-eval.
  loop = eval_loop.EvalLoop(model=model, dataset=dataset, split=dataset.eval_split, batch_size=batch_size,
                            partitioner=partitioner,
                            eval_step=eval_loop.make_eval_step(model, params_shardings, batch_shardings),
                            batch_shardings=batch_shardings, eval_steps=eval_steps, seed=seed)
  built = evaluators_lib.build(evaluators_lib.DEFAULT if evaluators is None else evaluators, model, dataset,
                               dataset.eval_split, loop=loop, results_dir=None)
  in_training = [e for e in built if e.during_training]

  def evaluate(params) -> tuple:
    return evaluators_lib.split_results(evaluators_lib.run_all(in_training, params))

  # ---- the loop: the run is accepted, so it may now write its configuration beside its checkpoints.
  if jax.process_index() == 0:
    tf.io.gfile.makedirs(model_dir)
    if config_text is not None:
      with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(config_text)
  logger = MetricLogger(model_dir, total_steps=train_steps, start_step=start_step)
  history = []
  train_log = []
  train_metrics: Dict[str, float] = {}
  eval_metrics: Dict[str, float] = {}
  eval_sparsity: Dict[str, float] = {}
  preempted = False
  last_saved = start_step if restored is not None else -1

  def check_finite(step: int):
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
      manager.wait_until_finished()  # an async save in flight is the last good checkpoint
      good = manager.last_verified_step()  # written by this run, or restored with its checksums matching
      if good is None and manager.latest_step() is not None:
        raise NonFiniteLossError(f"loss or gradients became NaN/inf at step {bad}; training stopped and no checkpoint "
                                 f"is verified: the newest, step {manager.latest_step()} in {manager.directory}, "
                                 "has no checksums")
      if good is None:
        raise NonFiniteLossError(f"loss or gradients became NaN/inf at step {bad}; training stopped and no "
                                 "checkpoint was written yet, so there is none to resume from")
      raise NonFiniteLossError(
          f"loss or gradients became NaN/inf at step {bad}; training stopped, parameters kept from step {bad} "
          f"and the last good checkpoint is step {good} in {manager.directory}")

  with _Preemption() as preemption:
    step = start_step
    while step < train_steps:
      batch = next(train_iter)
      state, metrics = p_train_step(state, partitioner.shard_batch(batch))
      step += 1
      history.append(metrics)
      is_last = step == train_steps
      # The first step is logged too: it shows where the loss starts.
      if step % log_period == 0 or is_last or step == start_step + 1:
        check_finite(step)
        train_metrics = _mean_metrics(jax.device_get(history))
        history = []
        logger.log_train(step, train_metrics)
        train_log.append((step, train_metrics))
      if eval_period and (step % eval_period == 0 or is_last):
        eval_metrics, eval_sparsity = evaluate(state.params)
        logger.log_eval(step, eval_metrics, eval_sparsity)
      stop = preemption.should_stop(step)
      if (checkpoint_period and step % checkpoint_period == 0) or is_last or stop:
        check_finite(step)
        manager.save(step, state, train_iter)
        last_saved = step
      if stop:
        preempted = True
        logging.warning("Stopped at step %d after %s; checkpoint written.", step,
                        preemption.signal_name or "SIGTERM")
        break
    if last_saved != int(state.step):
      check_finite(int(state.step))
      manager.save(int(state.step), state, train_iter)
  manager.close()
  logger.close()

  # Every process runs it: its computations span the devices of all of them (process 0's output is the run's).
  if end_of_training is not None and not preempted:
    end_of_training(model=model, params=state.params, dataset=dataset, partitioner=partitioner,
                    sparsity=eval_sparsity or {k[len("sparsity/"):]: v for k, v in train_metrics.items()
                                               if k.startswith("sparsity/")})
  return TrainResult(state=state, train_metrics=train_metrics, eval_metrics=eval_metrics,
                     sparsity=eval_sparsity, preempted=preempted, log=train_log,
                     stop_signal=(preemption.signal_name or "SIGTERM") if preempted else None)


def check_model_dir(model_dir: str) -> None:
  """A local ``model_dir`` that is a file, lies under a file, or cannot be written (a read-only filesystem, no
  permission) is a one-line ``ConfigError`` naming it, before anything is built or created.

  ``os.access`` reports a read-only filesystem even to root, and writes nothing. Remote paths (``gs://``) are
  left to the first write.
  """
  if "://" in model_dir:
    return
  path = os.path.abspath(model_dir)
  existing = path
  while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    if existing == path:
      raise ConfigError(f"MODEL_DIR {model_dir} is a file, not a directory; name a directory")
    raise ConfigError(f"MODEL_DIR {model_dir} cannot be made: {existing} is a file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    why = "is on a read-only filesystem" if read_only else "is not writable (permission denied)"
    raise ConfigError(f"MODEL_DIR {model_dir} cannot be written: {'it' if existing == path else existing} {why}")


def train_from_gin() -> TrainResult:
  """Runs :func:`train` as the current gin configuration binds it; ``MODEL_DIR/config.gin`` records that config.

  Every macro still bound to ``%gin.REQUIRED`` is a one-line ``ConfigError`` first, before any data or model is built.
  ``config.gin`` is written only once :func:`train` accepts the run (``config_text``), so a rejected launch
  (``TOP_K = 0``, a checkpoint of another model) leaves ``MODEL_DIR`` as it was.
  """
  gin_utils.check_required_macros()
  distributed.initialize()  # before gin builds train's arguments: a Partitioner lists every process's devices
  model_dir = gin_utils.get_macro("MODEL_DIR")
  try:
    before, listed = (_entries(model_dir) if tf.io.gfile.isdir(model_dir) else None), True
  except (OSError, tf.errors.OpError):  # an unreadable MODEL_DIR: train() reports it; nothing to tidy after it
    before, listed = None, False
  try:
    return gin.get_configurable(train)(config_text=gin.config_str())
  except BaseException:
    # A launch rejected after the checkpoint manager made its (empty) directories leaves none of them behind;
    # tidying never hides the error itself.
    if listed and jax.process_index() == 0:
      try:
        _remove_new_empty_directories(model_dir, before)
      except (OSError, tf.errors.OpError):
        pass
    raise


def _entries(directory: str) -> set:
  return {name.rstrip("/") for name in tf.io.gfile.listdir(directory)}


def _remove_new_empty_directories(model_dir: str, before: Optional[set]) -> None:
  """Removes what a failed launch made that holds no file: ``model_dir`` itself if it was new (``before`` is
  ``None``), else its entries not in ``before``. Anything written keeps its directory."""
  if not tf.io.gfile.isdir(model_dir):
    return
  new = [model_dir] if before is None else [os.path.join(model_dir, n) for n in _entries(model_dir) - before]
  for path in new:
    if model_dir_lock.is_lock_file(os.path.basename(path)):
      tf.io.gfile.remove(path)
      continue
    # The trainer's lock file (model_dir_lock) holds nothing of the run.
    if tf.io.gfile.isdir(path) and not any(not model_dir_lock.is_lock_file(f) for _, _, files in
                                           tf.io.gfile.walk(path) for f in files):
      tf.io.gfile.rmtree(path)
