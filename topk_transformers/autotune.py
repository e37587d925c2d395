"""Speed choices measured on the device that runs them, kept in a cache on disk.

Three choices in this project change only speed, never a result beyond float rounding:

* ``selection``: what ``top_k_method="auto"`` means (``topk.resolve_method``): ``exact`` (``lax.top_k``) or
  ``threshold`` (radix selection). Both keep the same set, so the array is the same bit for bit.
* ``decode_path``: whether a decoding step with ``sparse_decode=None`` computes its MLP densely or from the k
  selected rows of ``wo`` (``layers.MlpBlock``). The two agree up to float rounding.
* ``rows/gather_matvec`` and ``rows/gather_vecmat``: how the decoding steps read their gathered rows
  (``row_kernels``): the CPU FFI handlers, XLA's gather, or the Pallas kernels on GPU and TPU (``pallas_rows``).
  They agree up to float rounding.

The first time a choice is needed for a shape (backend, device kind, jax version, dtype and the sizes that matter),
which is when a step is traced, every candidate is compiled and timed on that device with concrete random arrays of
the shape, interleaved, and the fastest is kept (the rule's choice unless another beats it by more than
:data:`MARGIN`), in memory and in a JSON file that later processes read:
``$TOPK_AUTOTUNE_CACHE``, default ``~/.cache/topk_transformers/autotune.json``. Writes go through a temporary file
and a rename, so a reader sees the old file or the new one whole; an unreadable or corrupt file is one warning and is
ignored (it is rewritten at the next measurement).

``TOPK_AUTOTUNE=0`` (or ``false``, ``no``, ``off``) turns measuring off: every choice is then the rule measured on the
2-core CPU where the project was built (the ``default`` each caller passes). A multi-process run uses the rules too,
since each process would measure on its own and could compile a different program. The timer is injectable
(:func:`use_timer`), so tests fake it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

ENV_SWITCH = "TOPK_AUTOTUNE"
ENV_CACHE = "TOPK_AUTOTUNE_CACHE"
FORMAT = 1

# The default timer's budget per choice, after compilation: at least MIN_ROUNDS rounds (one call of each candidate
# per round), then rounds until BUDGET_S seconds have passed or MAX_ROUNDS are done.
MIN_ROUNDS = 3
MAX_ROUNDS = 25
BUDGET_S = 0.3

# Another candidate replaces the rule's choice only if it is faster by more than this share.
MARGIN = 0.05

Timer = Callable[[Mapping[str, Callable[[], Any]]], Dict[str, float]]
"""``timer({name: call}) -> {name: seconds}``: how long one call of each candidate takes."""

_lock = threading.RLock()  # reentrant: timing one choice may trace code that asks for another
_memory: Dict[str, Dict[str, Dict[str, Any]]] = {}  # cache path -> key -> entry
_warned: set = set()


def enabled() -> bool:
  """Whether choices are measured (``TOPK_AUTOTUNE``, default on) rather than taken from the CPU's rules."""
  return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_path() -> str:
  """The JSON cache: ``$TOPK_AUTOTUNE_CACHE``, else ``~/.cache/topk_transformers/autotune.json``."""
  return os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "topk_transformers",
                                                   "autotune.json")


def default_timer(calls: Mapping[str, Callable[[], Any]]) -> Dict[str, float]:
  """The median seconds of each call: one untimed call each (compilation), then interleaved rounds.

  A call that fails (a kernel the device's compiler rejects) takes ``inf`` and is not run again.
  """
  working = {}
  for name, call in calls.items():
    try:
      jax.block_until_ready(call())
      working[name] = call
    except Exception as e:  # pylint: disable=broad-except
      log.warning("autotune: candidate %s failed and is left out (%s: %s)", name, type(e).__name__,
                  str(e).splitlines()[0] if str(e) else "")
  times = {name: [] for name in working}
  start = time.perf_counter()
  for n in range(MAX_ROUNDS if working else 0):
    if n >= MIN_ROUNDS and time.perf_counter() - start > BUDGET_S:
      break
    for name, call in working.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(times[name]) if name in times else float("inf") for name in calls}


_timer: Timer = default_timer


@contextlib.contextmanager
def use_timer(timer: Timer):
  """Measures with ``timer`` inside the block (tests fake the device's speeds with it)."""
  global _timer
  with _lock:
    previous, _timer = _timer, timer
  try:
    yield
  finally:
    with _lock:
      _timer = previous


def forget() -> None:
  """Drops what this process has read or measured (the file stays); the next choice reads the file again."""
  with _lock:
    _memory.clear()
    _warned.clear()


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    log.warning("%s", message)


def _read(path: str) -> Dict[str, Dict[str, Any]]:
  """The file's entries; ``{}`` (with one warning) if it cannot be read or is not this format."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
      raise ValueError("not an autotune cache")
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict) and isinstance(v.get("choice"), str)}
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
    _warn_once(f"autotune cache {path} ignored ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return {}


def _write(path: str, key: str, entry: Dict[str, Any]) -> None:
  """Adds ``entry`` to the file, merged with what other processes wrote since; atomic (temporary file, rename)."""
  try:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    entries = dict(_read(path) if os.path.exists(path) else {})
    entries[key] = entry
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=directory)
    try:
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the cache from other users of a shared directory
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  except OSError as e:
    _warn_once(f"autotune cache {path} not written ({type(e).__name__}: {e}); choices are kept in memory")


def _entries(path: str) -> Dict[str, Dict[str, Any]]:
  if path not in _memory:
    _memory[path] = _read(path)
  return _memory[path]


def device() -> Dict[str, str]:
  """The backend and device kind that choices are measured on (the default backend's first device)."""
  dev = jax.devices()[0]
  return {"backend": dev.platform, "device_kind": dev.device_kind}


def key_of(kind: str, shape: Mapping[str, Any], candidates) -> str:
  """The cache key: what is chosen, on which device and jax, for which sizes, among which candidates."""
  dev = device()
  sizes = ",".join(f"{name}={shape[name]}" for name in sorted(shape))
  return f"{kind}|{dev['backend']}|{dev['device_kind']}|jax {jax.__version__}|{sizes}|among {','.join(sorted(candidates))}"


def choose(kind: str, shape: Mapping[str, Any], candidates: Mapping[str, Callable[[], Callable[[], Any]]],
           default: str) -> str:
  """The fastest of ``candidates`` for ``shape`` on this device, measured once and cached; ``default`` when off.

  Args:
    kind: what is chosen (``selection``, ``decode_path``, ``rows/...``).
    shape: the sizes and dtype the speed depends on (JSON scalars).
    candidates: ``name -> build``; ``build()`` returns a call without arguments that runs the candidate on
      concrete arrays of ``shape`` (built only when measuring).
    default: the rule's choice, one of ``candidates``: used when measuring is off or impossible.
  """
  if default not in candidates:
    raise ValueError(f"default {default!r} is not among the candidates {sorted(candidates)}")
  if len(candidates) == 1 or not enabled():
    return default
  if jax.process_count() > 1:
    _warn_once("autotune is off in multi-process runs (each process could choose differently); the rules apply")
    return default
  key = key_of(kind, shape, candidates)
  path = cache_path()
  with _lock:
    entries = _entries(path)
    entry = entries.get(key)
    if entry is not None and entry["choice"] in candidates:
      return entry["choice"]
    t0 = time.perf_counter()
    with jax.ensure_compile_time_eval():  # concrete arrays even while a step is being traced
      calls = {}
      for name, build in candidates.items():
        try:
          calls[name] = build()
        except Exception as e:  # pylint: disable=broad-except  # e.g. a kernel that does not lower here
          log.warning("autotune: candidate %s of %s could not be built and is left out (%s: %s)", name, kind,
                      type(e).__name__, str(e).splitlines()[0] if str(e) else "")
      seconds = {name: float("inf") for name in candidates}
      seconds.update(_timer(calls) if calls else {})
    fastest = min(candidates, key=lambda name: (seconds[name], name != default))
    # The rule stands unless beaten by more than the noise of a shared machine (or unless nothing ran).
    choice = fastest if seconds[fastest] < (1.0 - MARGIN) * seconds[default] else default
    entry = {"choice": choice, "rule": default,
             "seconds": {name: (float(t) if t != float("inf") else None) for name, t in seconds.items()},
             "measured_in_s": round(time.perf_counter() - t0, 3),
             "date": datetime.datetime.now().isoformat(timespec="seconds")}
    entries[key] = entry
    _write(path, key, entry)
  log.info("autotune %s %s: %s (%s; the rule says %s)", kind, dict(shape), choice,
           ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in seconds.items()), default)
  return choice


# ---------------------------------------------------------------------------
# The three choices: candidates on concrete random arrays of the shape.
# ---------------------------------------------------------------------------


def _normal(shape, dtype, seed, scale=1.0):
  x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(scale)
  return jax.device_put(x.astype(jnp.dtype(dtype)))


def selection_method(tokens: int, d_ff: int, k: int, dtype, default: str) -> str:
  """``exact`` or ``threshold`` for ``topk`` on ``[tokens, d_ff]``, timed forward and backward (a training step's
  use; both give the same array, so the choice is safe for evaluation too)."""
  from topk_transformers import topk  # pylint: disable=g-import-not-at-top

  def build(method):
    x, ct = _normal((tokens, d_ff), dtype, 0), _normal((tokens, d_ff), dtype, 1)
    grad = jax.jit(jax.grad(lambda x: jnp.vdot(topk.topk(x, k, method).astype(jnp.float32),
                                               ct.astype(jnp.float32))))
    return lambda: grad(x)

  shape = {"dtype": jnp.dtype(dtype).name, "tokens": int(tokens), "d_ff": int(d_ff), "k": int(k)}
  return choose("selection", shape, {m: (lambda m=m: build(m)) for m in ("exact", "threshold")}, default)


def decode_path(x_shape, d_ff: int, settings, default: str) -> str:
  """``dense`` or ``sparse`` for a decoding MLP step on ``x [..., d_model]`` (``mlp_steps.Settings``)."""
  from topk_transformers import mlp_steps  # pylint: disable=g-import-not-at-top
  from topk_transformers import topk  # pylint: disable=g-import-not-at-top

  if not all(isinstance(a, str) for a in settings.activations):
    return default  # a callable activation has no name to key the cache by
  d = int(x_shape[-1])
  dtype = jnp.dtype(settings.dtype)
  params = {name: {"kernel": _normal((d, d_ff), dtype, 2 + i, d ** -0.5)}
            for i, name in enumerate(mlp_steps.branch_names(len(settings.activations)))}
  params["wo"] = {"kernel": _normal((d_ff, d), dtype, 9, d_ff ** -0.5)}
  x = _normal(tuple(x_shape), dtype, 10)

  def dense(params, x):
    h = topk.topk(mlp_steps.hidden(params, x, settings.activations, dtype), settings.top_k, settings.method,
                  settings.recall_target, by_magnitude=settings.gated)
    return mlp_steps.linear(h, params["wo"], dtype)

  def sparse(params, x):
    return mlp_steps.sparse_step(params, x, settings)[0]

  def build(fn):
    jitted = jax.jit(fn)
    return lambda: jitted(params, x)

  shape = {"dtype": dtype.name, "tokens": int(np.prod(x_shape[:-1])), "d_model": d, "d_ff": int(d_ff),
           "k": int(settings.top_k), "activations": "*".join(settings.activations), "method": settings.method,
           "row_kernels": bool(settings.row_kernels)}
  return choose("decode_path", shape, {"dense": lambda: build(dense), "sparse": lambda: build(sparse)}, default)


def row_implementation(op: str, a_shape, w_shape, idx_shape, dtype,
                       implementations: Mapping[str, Callable[..., Any]], default: str) -> str:
  """Which of ``implementations`` (``name -> fn(a, w, idx)``) computes ``op`` fastest for these shapes."""
  n, d = (int(s) for s in w_shape)
  rng = np.random.default_rng(11)
  a = _normal(tuple(a_shape), dtype, 12)
  w = _normal((n, d), dtype, 13)
  idx = jax.device_put(rng.integers(0, n, tuple(idx_shape), dtype=np.int32))

  def build(fn):
    jitted = jax.jit(fn)
    return lambda: jitted(a, w, idx)

  shape = {"dtype": jnp.dtype(dtype).name, "a": "x".join(map(str, a_shape)), "n": n, "d": d,
           "idx": "x".join(map(str, idx_shape))}
  return choose(f"rows/{op}", shape, {name: (lambda fn=fn: build(fn)) for name, fn in implementations.items()},
                default)


def cached_entries(path: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
  """What the cache file holds (for reports: the device check copies it)."""
  return _read(path or cache_path())
