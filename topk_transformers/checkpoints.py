"""Checkpoints: orbax for the train state, tf.data iterator state for the data position.

Layout under ``MODEL_DIR``::

    checkpoints/<step>/state/...            orbax (params, optimizer state, step), sharded arrays
    checkpoints_data/<step>/process_<i>*    the host's tf.data iterator (where its data stream stands)

The data position is saved per host next to the orbax step, so a restarted run
reads exactly the batches it has not seen. Pipelines whose iterator cannot be
checkpointed (e.g. ones built on Python generators) fall back to skipping the
consumed batches on restore, which gives the same stream, only slower.

A newest checkpoint that cannot be read (truncated or deleted files) stops the
restore with an :class:`UnreadableCheckpointError` naming its step and path;
with ``skip_unreadable=True`` the restore goes back to the newest readable step
instead and moves the unreadable newer ones, state and data position, under
``checkpoints_unreadable/``, so nothing is deleted and later saves of those
step numbers do not collide with them.

Every save records a checksum of each array (``checkpoints/<step>/checksums``,
an orbax item committed with the arrays) and of each data-position file
(``process_<i>.checksums.json`` beside them), and every restore verifies them.
orbax 0.12 has no option that checks the array data (its zarr3 layout checksums
only the shard index, its default zarr2 layout nothing), and zstd stores
incompressible data raw: garbage inside an array file reads back as numbers.
A mismatch, a missing or changed data-position file, or a non-finite float
after a restore makes the step unreadable, with one line naming the step and
the array. Checkpoints written before checksums existed restore unverified,
with one log line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import time
import zlib
from typing import Any, Callable, List, Optional

import jax
import orbax.checkpoint as ocp
import tensorflow as tf

from topk_transformers import distributed
from topk_transformers.checksums import CHECKSUMS, fingerprints  # noqa: F401  (checkpoints.fingerprints, as before)
from topk_transformers.checksums import FORMAT as _CHECKSUM_FORMAT
from topk_transformers.checksums import key_str as _key_str
from topk_transformers.checksums import record as _record

SHARDS_FILE = "shards.json"  # in checkpoints_data/<step>/: how many data shards its positions were saved for


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used for this model (wrong shapes, unreadable files)."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint that could not be written (a full disk, a read-only filesystem); its temporary files are removed."""


class UnreadableCheckpointError(CheckpointError):
  """A checkpoint whose files cannot be read (truncated, deleted, corrupt); ``step`` and ``path`` name it."""

  def __init__(self, message: str, step: Optional[int] = None, path: Optional[str] = None):
    super().__init__(message)
    self.step, self.path = step, path


_SPEC_DUMP = "See full TensorStore details"


def _first_line(e: BaseException, limit: int = 240) -> str:
  """``Type: first line`` of an exception. orbax wraps TensorStore's error (its cause, which names the file
  and what is wrong with it) in one that appends the whole TensorStore spec: the cause is named instead."""
  if _SPEC_DUMP in str(e) and e.__cause__ is not None:
    return _first_line(e.__cause__, limit)
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text.split(_SPEC_DUMP)[0].strip().rstrip(".")
  text = text if len(text) <= limit else text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _orbax_logs(demote: Callable[[logging.LogRecord, bool], bool]):
  """Holds orbax's log records during the block; then ``demote(record, failed)`` ones go to DEBUG, the rest out.

  A checkpoint that cannot be read becomes one error line (or one warning when
  skipped); orbax's own ERROR lines about the same file would only bury it.
  """
  held: List[logging.LogRecord] = []

  def hold(record):
    held.append(record)
    return False

  loggers = [logging.getLogger(name) for name in ("absl", "orbax")]  # orbax logs through absl
  for logger in loggers:
    logger.addFilter(hold)
  failed = True
  try:
    yield
    failed = False
  finally:
    for logger in loggers:
      logger.removeFilter(hold)
    for record in held:
      if demote(record, failed):
        logging.debug("orbax: %s", record.getMessage())
      else:
        logging.getLogger(record.name).handle(record)


def verify(tree: Any, recorded: Optional[dict], step: int, path: str) -> None:
  """Raises :class:`UnreadableCheckpointError` for a restored array that differs from its recorded checksum, or
  that holds NaN/inf; ``recorded=None`` (a checkpoint from before checksums) checks only the latter, and logs it."""
  if recorded is None:
    logging.info("checkpoint step %d at %s has no checksums (written before they were recorded): restored "
                 "unverified", step, path)
  elif recorded.get("format") != _CHECKSUM_FORMAT:
    raise UnreadableCheckpointError(f"checkpoint step {step} at {path} cannot be read (its checksums are of an "
                                    f"unknown format {recorded.get('format')!r})", step=step, path=path)
  arrays = (recorded or {}).get("arrays", {})
  for name, now in fingerprints(tree).items():
    then = arrays.get(name)
    if then is not None and (then["shape"], then["dtype"]) == (now["shape"], now["dtype"]):
      if then["checksum"] != now["checksum"]:
        raise UnreadableCheckpointError(f"checkpoint step {step} at {path} cannot be read (array {name} does not "
                                        "match its checksum: the file holding it was changed or damaged)",
                                        step=step, path=path)
    if not now["finite"]:
      raise UnreadableCheckpointError(f"checkpoint step {step} at {path} cannot be read (array {name} holds NaN or "
                                      "inf)", step=step, path=path)
  if recorded is not None:
    logging.info("checkpoint step %d: every restored array matches its checksum", step)


def _file_checksums(paths: List[str]) -> dict:
  out = {}
  for path in paths:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
    out[os.path.basename(path)] = {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
  return out


class _DemoteBackgroundFailures(logging.Filter):
  _ABOUT = ("background save thread", "Save Finalize thread", "save_finalize", "_SignalingThread.run() raised",
            "Failed to write metadata")

  def filter(self, record):
    if record.levelno >= logging.ERROR and any(a in record.getMessage() for a in self._ABOUT):
      logging.debug("orbax: %s", record.getMessage())
      return False
    return True


class _DemoteAbandonedTasks(logging.Filter):
  """asyncio's "Task exception was never retrieved" for the reads or writes orbax gave up on after the first one
  failed (each with a traceback and a TensorStore spec): the failure is already reported in one line.

  In place before any read or write: such a task can be collected, and logged, before the failure reaches us."""

  def filter(self, record):
    if "exception was never retrieved" in record.getMessage():
      logging.debug("orbax: %s", record.getMessage().splitlines()[0])
      return False
    return True


_ABANDONED_TASKS = _DemoteAbandonedTasks()


def _quiet_abandoned_tasks() -> None:
  logger = logging.getLogger("asyncio")
  if _ABANDONED_TASKS not in logger.filters:
    logger.addFilter(_ABANDONED_TASKS)


class CheckpointManager:
  """Periodic, keep-N checkpoints of a train state and the data iterator."""

  def __init__(self, model_dir: str, keep: Optional[int] = 3, async_save: bool = True):
    self.directory = os.path.join(model_dir, "checkpoints")
    self._data_dir = os.path.join(model_dir, "checkpoints_data")
    # Where restore_latest(skip_unreadable=True) moves unreadable steps: <step> and data/<step>.
    self.unreadable_dir = os.path.join(model_dir, "checkpoints_unreadable")
    _quiet_abandoned_tasks()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    # orbax complains here about each step whose metadata it cannot read; restore_latest
    # checks the steps it uses and names an unreadable one in one line.
    step_file = re.compile(re.escape(self.directory.rstrip("/")) + r"/\d+/")
    about_a_step = lambda record: record.levelno >= logging.WARNING and bool(step_file.search(record.getMessage()))
    with _orbax_logs(lambda record, failed: not failed and about_a_step(record)):
      self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                        CHECKSUMS: ocp.JsonCheckpointHandler()})
    self._verified = set()  # steps this manager saved, or restored with every checksum matching
    self._pending: Optional[int] = None  # the newest step saved, perhaps still being written asynchronously
    # A failed asynchronous save is logged by orbax's background thread (with tracebacks) when it happens; it is
    # reported once, as CheckpointWriteError's one line, at the next save or wait: those records go to DEBUG.
    self._background_failures = _DemoteBackgroundFailures()
    logging.getLogger("absl").addFilter(self._background_failures)

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def wait_until_finished(self) -> None:
    """Blocks until an asynchronous save has been written and finalised (a failed one: :class:`CheckpointWriteError`)."""
    with self._writing(None):
      self._mngr.wait_until_finished()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def last_verified_step(self) -> Optional[int]:
    """The newest kept step that this manager wrote or restored with its checksums matching (``None``: none)."""
    kept = set(self._mngr.all_steps()) & self._verified
    return max(kept) if kept else None

  # ---- save
  def save(self, step: int, state: Any, data_iterator: Any = None) -> None:
    """Writes ``step``; a write that fails (here, or an asynchronous one that fails later and is found by the next
    save, :meth:`wait_until_finished` or :meth:`close`) is a one-line :class:`CheckpointWriteError` naming the step,
    after the failed step's temporary files are removed. The checkpoints written before it stay as they were."""
    checksums = _record(state, step)
    with self._writing(step):
      self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    **{CHECKSUMS: ocp.args.JsonSave(checksums)}), force=True)
      self._verified.add(int(step))
      if data_iterator is not None:
        self._save_iterator(step, data_iterator)
      self._prune_data(keep_also=step)
    self._pending = int(step)

  @contextlib.contextmanager
  def _writing(self, step: Optional[int]):
    """Turns a failed write into :class:`CheckpointWriteError`: the step in flight (an asynchronous save still
    being written) or ``step`` is removed from what is kept, with its temporary files."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # orbax and TensorFlow raise many types
      if isinstance(e, CheckpointError) or distributed.is_peer_failure(e):
        raise  # another process is gone: nothing here to tidy, and the run stops (commands/common.py)
      failed = self._pending if self._pending is not None and self._pending not in self._committed() else step
      self._pending = None
      raise self._write_failed(failed, e) from None

  def _committed(self) -> set:
    return {int(n) for n in tf.io.gfile.listdir(self.directory) if n.rstrip("/").isdigit()
            and tf.io.gfile.exists(os.path.join(self.directory, n.rstrip("/"), "commit_success.txt"))} \
        if tf.io.gfile.isdir(self.directory) else set()

  def _remove_failed(self, step: Optional[int]) -> bool:
    """Removes orbax's temporary directories and ``step``'s uncommitted files; whether there were any."""
    found = False
    for name in tf.io.gfile.listdir(self.directory):
      name = name.rstrip("/")
      if ".orbax-checkpoint-tmp" in name or (name == str(step) and int(step) not in self._committed()):
        tf.io.gfile.rmtree(os.path.join(self.directory, name))
        found = True
    if step is not None and int(step) not in self._committed():
      data = os.path.join(self._data_dir, str(step))
      if tf.io.gfile.exists(data):
        tf.io.gfile.rmtree(data)
        found = True
    return found

  def _write_failed(self, step: Optional[int], e: BaseException) -> "CheckpointWriteError":
    self._verified.discard(step)
    removed = True
    try:  # orbax's threads may still be writing the failed step: let them end before tidying
      self._mngr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  # the same failure, already in hand
      pass
    try:
      # TensorStore may still finish an open of the failed step after orbax has given up on it (the tasks orbax
      # stopped waiting for), making its directory again: tidy until nothing is left twice in a row.
      quiet = 0
      for _ in range(50):
        found = self._remove_failed(step)
        quiet = 0 if found else quiet + 1
        if quiet == 2:
          break
        time.sleep(0.1)
      else:
        removed = False
      self._mngr.reload()
    except Exception:  # pylint: disable=broad-except  # tidying never hides the error itself
      removed = False
    kept = sorted(self._committed() - {step})
    why = "no space left on device" if _no_space(e) else _first_line(_root_cause(e))
    return CheckpointWriteError(
        f"cannot write checkpoint step {step} in {self.directory} ({why}); "
        + ("its temporary files are removed" if removed else "its temporary files could not all be removed")
        + (f" and the newest checkpoint, step {kept[-1]}, is kept" if kept else "; no earlier checkpoint exists")
        + "; free space and run the same command again to resume")

  def _iterator_prefix(self, step: int, shard: Optional[int] = None) -> str:
    """Where a data position is kept: one per data shard (``shard_<j>``), or, for a plain iterator, one per
    process (``process_<i>``, as checkpoints written before data shards have it)."""
    name = f"process_{jax.process_index()}" if shard is None else f"shard_{shard}"
    return os.path.join(self._data_dir, str(step), name)

  def _save_iterator(self, step: int, data) -> None:
    """Saves the data position of ``step``: each shard of a ``host_data.HostBatches`` (process 0 records their
    count in ``shards.json``), or a plain tf.data iterator as this process's."""
    if not hasattr(data, "shard_iterators"):
      self._save_position(step, self._iterator_prefix(step), data)
      return
    for shard, iterator in sorted(data.shard_iterators().items()):
      self._save_position(step, self._iterator_prefix(step, shard), iterator)
    if jax.process_index() == 0:
      with tf.io.gfile.GFile(os.path.join(self._data_dir, str(step), SHARDS_FILE), "w") as f:
        json.dump({"data_shards": data.data_shards, "process_count": jax.process_count()}, f)

  def _save_position(self, step: int, prefix: str, iterator) -> None:
    tf.io.gfile.makedirs(os.path.dirname(prefix))
    try:
      tf.train.Checkpoint(iterator=iterator).write(prefix)
    except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError):
      raise  # a full disk or a read-only one: the checkpoint is not written (CheckpointWriteError)
    except (tf.errors.OpError, TypeError, ValueError) as e:
      # Not checkpointable (e.g. a py_function in the pipeline): record the step; restore skips.
      logging.warning("data iterator is not checkpointable (%s); a restart will skip %d batches", e, step)
      with tf.io.gfile.GFile(prefix + ".skip.json", "w") as f:
        json.dump({"batches_consumed": step}, f)
    written = [p for p in tf.io.gfile.glob(prefix + ".*") if not p.endswith(".checksums.json")]
    with tf.io.gfile.GFile(prefix + ".checksums.json", "w") as f:
      json.dump({"files": _file_checksums(written)}, f)

  def data_shards(self, step: Optional[int] = None) -> Optional[int]:
    """How many data shards the data position of ``step`` (default: the newest step) was saved for: its
    ``shards.json``, or 1 for a checkpoint written before data shards; ``None`` without a checkpoint."""
    step = self._mngr.latest_step() if step is None else step
    if step is None:
      return None
    path = os.path.join(self._data_dir, str(step), SHARDS_FILE)
    try:
      with tf.io.gfile.GFile(path) as f:
        return int(json.load(f)["data_shards"])
    except (tf.errors.OpError, ValueError, KeyError, TypeError):
      return 1

  def _prune_data(self, keep_also: int) -> None:
    """Drops iterator states of steps orbax no longer keeps (without waiting for an async save); process 0 does it
    for all."""
    if jax.process_index() != 0 or not tf.io.gfile.exists(self._data_dir):
      return
    kept = {str(s) for s in self._mngr.all_steps()} | {str(keep_also)}
    for name in tf.io.gfile.listdir(self._data_dir):
      name = name.rstrip("/")
      if name not in kept:
        tf.io.gfile.rmtree(os.path.join(self._data_dir, name))

  # ---- restore
  def restore_latest(self, abstract_state: Any, shardings: Any, data_iterator: Any = None,
                     skip_unreadable: bool = False) -> Optional[Any]:
    """The newest checkpoint, restored with the given shardings; ``None`` if there is none.

    The data position of that step is restored into ``data_iterator`` too. An
    unreadable newest step raises :class:`UnreadableCheckpointError`; with
    ``skip_unreadable`` the newest readable step is restored instead, the
    unreadable newer ones are logged and moved to ``unreadable_dir`` (nothing is
    deleted), and only if no step can be read is it an error. A checkpoint of
    another model is a :class:`CheckpointError` either way.
    """
    steps = sorted(self._mngr.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
      error = None
      try:
        state = self._restore_step(step, abstract_state, shardings, data_iterator)
      except UnreadableCheckpointError as e:
        error = e
      # Every process tries the same steps in the same order, and a step counts as read only if all of them read
      # it: they restore the same step, and only process 0 moves the unreadable ones aside.
      failed = distributed.processes_where(error is not None)
      if failed and error is None:
        error = self._unreadable(step, f"process {failed[0]} of {jax.process_count()} cannot read it")
      if error is not None:
        if not skip_unreadable:
          raise error
        logging.warning("skipping unreadable checkpoint: %s", error)
        unreadable.append(step)
        continue
      if unreadable:
        self._move_unreadable(unreadable)
      return state
    if unreadable:
      raise UnreadableCheckpointError(
          f"no checkpoint in {self.directory} can be read (steps {', '.join(map(str, unreadable))}); "
          f"move them away to start afresh", step=unreadable[0], path=self.directory)
    return None

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _unreadable(self, step: int, cause: str) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(f"checkpoint step {step} at {self.step_path(step)} cannot be read ({cause})",
                                     step=step, path=self.step_path(step))

  def _restore_step(self, step: int, abstract_state: Any, shardings: Any, data_iterator: Any) -> Any:
    with _orbax_logs(lambda record, failed: failed):
      self._check_compatible(step, abstract_state)
      target = jax.tree_util.tree_map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
      items = {"state": ocp.args.StandardRestore(target)}
      has_checksums = tf.io.gfile.exists(os.path.join(self.step_path(step), CHECKSUMS))
      if has_checksums:
        items[CHECKSUMS] = ocp.args.JsonRestore()
      try:
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # orbax raises many types; the user needs one line
        raise self._unreadable(step, _first_line(e)) from None
    verify(restored["state"], restored[CHECKSUMS] if has_checksums else None, step, self.step_path(step))
    if data_iterator is not None:
      try:
        self._restore_iterator(step, data_iterator)
      except (tf.errors.OpError, AssertionError, ValueError, IndexError) as e:  # IndexError: a truncated file
        raise self._unreadable(step, f"its data position: {_first_line(e)}") from None
    if has_checksums:
      self._verified.add(int(step))
    return restored["state"]

  def _move_unreadable(self, steps: List[int]) -> None:
    """Moves unreadable steps (orbax's directory and the data position) under ``unreadable_dir``."""
    if jax.process_index() == 0:
      for step in steps:
        moved = []
        data_dir = os.path.join(self._data_dir, str(step))
        for src, dst in ((self.step_path(step), os.path.join(self.unreadable_dir, str(step))),
                         (data_dir, os.path.join(self.unreadable_dir, "data", str(step)))):
          if not tf.io.gfile.exists(src):
            continue
          n = 1
          while tf.io.gfile.exists(dst if n == 1 else f"{dst}.{n}"):  # set aside before, by an earlier run
            n += 1
          dst = dst if n == 1 else f"{dst}.{n}"
          tf.io.gfile.makedirs(os.path.dirname(dst))
          try:
            tf.io.gfile.rename(src, dst)
          except tf.errors.OpError as e:
            raise CheckpointError(f"cannot move the unreadable checkpoint {src} to {dst} ({_first_line(e)}); "
                                  "move it away yourself") from None
          moved.append(dst)
        logging.warning("moved unreadable checkpoint step %d to %s", step, " and ".join(moved))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("topk_transformers.checkpoints.move_unreadable")
    self._mngr.reload()

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    try:
      meta = self._mngr.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, f"metadata: {_first_line(e)}") from None
    problem = _incompatibility(abstract_state, getattr(meta, "tree", meta))
    if problem == _NO_METADATA:  # e.g. its files were deleted: orbax finds no metadata, not another model
      raise self._unreadable(step, "no array metadata found")
    if problem:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is of a different model: {problem}; "
                            "use another MODEL_DIR")

  def _restore_iterator(self, step: int, data) -> None:
    """Restores the data position of ``step`` into ``data`` (see :meth:`_save_iterator`). A position saved for
    another number of data shards cannot be continued: the data starts over, with a warning."""
    if not hasattr(data, "shard_iterators"):
      self._restore_position(step, self._iterator_prefix(step), data)
      return
    saved = self.data_shards(step)
    if saved != data.data_shards:
      logging.warning("the data position of step %d was saved for %d data shards and this run reads %d: the data "
                      "starts over from the beginning of its stream (examples already seen are seen again)",
                      step, saved, data.data_shards)
      return
    legacy = not tf.io.gfile.exists(os.path.join(self._data_dir, str(step), SHARDS_FILE))
    for shard, iterator in sorted(data.shard_iterators().items()):
      # A checkpoint written before data shards kept its one position as process_0.
      prefix = os.path.join(self._data_dir, str(step), "process_0") if legacy else self._iterator_prefix(step, shard)
      self._restore_position(step, prefix, iterator)

  def _restore_position(self, step: int, prefix: str, iterator) -> None:
    self._verify_iterator_files(step, prefix)
    if tf.io.gfile.exists(prefix + ".index"):
      tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()
      return
    skip_file = prefix + ".skip.json"
    consumed = step
    if tf.io.gfile.exists(skip_file):
      with tf.io.gfile.GFile(skip_file) as f:
        consumed = int(json.load(f)["batches_consumed"])
    else:
      logging.warning("no data position saved for step %d: skipping %d batches", step, consumed)
    for _ in range(consumed):
      next(iterator)

  def _verify_iterator_files(self, step: int, prefix: str) -> None:
    """Each data-position file this host wrote for ``step`` is there, whole and unchanged."""
    listing = prefix + ".checksums.json"
    if not tf.io.gfile.exists(listing):
      if tf.io.gfile.exists(prefix + ".index"):
        logging.info("the data position of step %d has no checksums (written before they were recorded): "
                     "restored unverified", step)
      return
    try:
      with tf.io.gfile.GFile(listing) as f:
        recorded = json.load(f)["files"]
    except (tf.errors.OpError, ValueError, KeyError, TypeError) as e:
      raise self._unreadable(step, f"its data position's checksums {listing}: {_first_line(e)}") from None
    folder = os.path.dirname(prefix)
    for name, then in sorted(recorded.items()):
      path = os.path.join(folder, name)
      if not tf.io.gfile.exists(path):
        raise self._unreadable(step, f"its data position: {path} is missing")
      now = _file_checksums([path])[name]
      if now["size"] != then["size"]:
        raise self._unreadable(step, f"its data position: {path} has {now['size']} bytes, {then['size']} were written")
      if now["crc32"] != then["crc32"]:
        raise self._unreadable(step, f"its data position: {path} does not match its checksum")

  def close(self) -> None:
    try:
      self.wait_until_finished()
    finally:
      self._mngr.close()
      logging.getLogger("absl").removeFilter(self._background_failures)


def _root_cause(e: BaseException) -> BaseException:
  seen = set()
  while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return e


def _no_space(e: BaseException) -> bool:
  """Whether a full disk (or quota) is somewhere in the exception's chain."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


_NO_METADATA = "no array metadata found"


def _incompatibility(abstract: Any, meta: Any) -> Optional[str]:
  """What differs between a model's abstract tree and a checkpoint's metadata tree (``None``: nothing)."""
  want = {_key_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  have = {}
  for p, x in jax.tree_util.tree_flatten_with_path(meta)[0]:
    shape = getattr(x, "shape", None)
    if shape is not None:
      have[_key_str(p)] = tuple(shape)
  if not have:
    return _NO_METADATA
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  if missing or extra:
    name = (missing or extra)[0]
    return (f"{'missing' if missing else 'unexpected'} parameter {name!r} "
            f"({len(missing)} missing, {len(extra)} unexpected)")
  for name, shape in want.items():
    if have[name] != shape:
      return f"{name!r} has shape {have[name]} there but {shape} in this model"
  return None


def locate(path: str) -> tuple:
  """``(checkpoints_dir, step)`` for a run directory (its latest step) or one step's directory."""
  path = path.rstrip("/")
  if "://" not in path:
    path = os.path.abspath(path)  # orbax takes absolute paths only; a user types relative ones
  base = os.path.basename(path)
  if base.isdigit() and tf.io.gfile.isdir(path):
    return os.path.dirname(path), int(base)
  ckpt_dir = os.path.join(path, "checkpoints") if tf.io.gfile.isdir(os.path.join(path, "checkpoints")) else path
  if not tf.io.gfile.isdir(ckpt_dir):
    raise CheckpointError(f"no checkpoint at {path!r} (expected a run directory or .../checkpoints/<step>)")
  steps = sorted(int(n.rstrip("/")) for n in tf.io.gfile.listdir(ckpt_dir) if n.rstrip("/").isdigit())
  if not steps:
    raise CheckpointError(f"no checkpoint steps in {ckpt_dir!r}")
  return ckpt_dir, steps[-1]


def restore_params(path: str, abstract_params: Any, shardings: Any) -> tuple:
  """Only the parameters of a training checkpoint (no optimizer state), placed with ``shardings``.

  ``path`` is a run directory (latest step) or ``.../checkpoints/<step>``. Returns ``(params, step)``.
  """
  ckpt_dir, step = locate(path)
  _quiet_abandoned_tasks()
  target = {"params": jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)}
  # orbax warns three times that a read-only manager is read-only.
  with _orbax_logs(lambda record, failed: not failed and "read only" in record.getMessage().replace("_", " ")):
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                CHECKSUMS: ocp.JsonCheckpointHandler()})
  step_path = os.path.join(ckpt_dir, str(step))
  try:
    with _orbax_logs(lambda record, failed: failed):
      try:
        meta = mngr.item_metadata(step)["state"]
        meta = getattr(meta, "tree", meta)
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f"cannot restore parameters from step {step} in {ckpt_dir} (metadata: "
                              f"{_first_line(e)})") from None
      # partial_restore fills a parameter the checkpoint lacks with its abstract placeholder: check first.
      problem = _incompatibility({"params": abstract_params}, {"params": (meta or {}).get("params", {})})
      if problem == _NO_METADATA:
        raise CheckpointError(f"cannot restore parameters from step {step} in {ckpt_dir} (no array metadata found: "
                              "its files are missing or damaged)")
      if problem:
        raise CheckpointError(f"cannot restore parameters from step {step} in {ckpt_dir} (a different model: "
                              f"{problem})")
      items = {"state": ocp.args.PyTreeRestore(item=target,
                                               restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                               partial_restore=True)}
      has_checksums = tf.io.gfile.exists(os.path.join(step_path, CHECKSUMS))
      if has_checksums:
        items[CHECKSUMS] = ocp.args.JsonRestore()
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # one line for the user, whatever orbax raised
        raise CheckpointError(f"cannot restore parameters from step {step} in {ckpt_dir} ({_first_line(e)})") from None
  finally:
    mngr.close()
  verify({"params": restored["state"]["params"]}, restored[CHECKSUMS] if has_checksums else None, step, step_path)
  return restored["state"]["params"], step
