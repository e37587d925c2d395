"""Products over gathered rows, the two reads of sparse decoding: ``c`` rows of ``wi`` and ``k`` rows of ``wo``.

* :func:`gather_matvec` ``(x [..., d], w [n, d], idx [..., c]) -> [..., c]``: ``x . w[idx]``, the hidden
  activations of the candidate units from their rows of ``wi_rows`` (``[mlp, embed]``).
* :func:`gather_vecmat` ``(v [..., k], w [n, d], idx [..., k]) -> [..., d]``: ``sum_j v_j w[idx_j]``, the MLP
  output from the k selected rows of ``wo``.

XLA:CPU computes a product of gathered rows as a gather that copies the rows, on one thread, and a product that
reads the copy: three passes over the rows. Unbatched decoding of a Large T5 with predicted neurons spends most of
its MLP time there (``docs/design/decoding_paths.md``). On CPU, for float32, these functions call two XLA FFI handlers
(``native/row_kernels.cc``) that read each selected row once, four rows at a time, split over XLA's intra-op
threads. Elsewhere (GPU, TPU, other dtypes) and when the handlers cannot be built, they are the plain JAX
expressions (gather, then einsum), which give the same values up to float rounding. On GPU and TPU the Pallas
kernels of ``pallas_rows.py`` are a third candidate; where more than one applies, ``autotune`` times them on the
device and keeps the fastest (``TOPK_AUTOTUNE=0``: the CPU handler where it applies, else XLA's gather).

The handlers are compiled on first use with the system C++ compiler (``$CXX``, else ``c++``/``g++``) against the
installed jaxlib's FFI headers (``jax.ffi.include_dir()``), into ``$TOPK_NATIVE_CACHE`` (default
``~/.cache/topk_transformers``), keyed by the source, the jaxlib version and the CPU, in a few seconds. Nothing is
downloaded. ``TOPK_NATIVE=0`` turns them off; without a compiler the JAX path is used, with one line in the log.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "native", "row_kernels.cc")
_TARGETS = ("topk_gather_matvec", "topk_gather_vecmat")
_lock = threading.Lock()
_state = {"loaded": None, "reason": None}


def _enabled_by_env() -> bool:
  return os.environ.get("TOPK_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> Optional[str]:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_tag() -> str:
  """What ``-march=native`` depends on: the machine and its CPU flags."""
  flags = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("flags", "Features", "model name")):
          flags += line
  except OSError:
    pass
  return platform.machine() + flags


def library_path() -> str:
  """Where the compiled handlers live for this source, jaxlib and CPU."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(source + jaxlib.__version__.encode() + _cpu_tag().encode()).hexdigest()[:16]
  cache = os.environ.get("TOPK_NATIVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "topk_transformers")
  return os.path.join(cache, f"row_kernels-{key}.so")


def _build(path: str) -> None:
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-fno-math-errno"]
  if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
    flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
  cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"{os.path.basename(cxx)} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    os.replace(tmp, path)  # atomic: a concurrent process sees the old library or the whole new one
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def available() -> bool:
  """Whether the CPU handlers are built and registered (builds them on the first call; thread-safe)."""
  with _lock:
    if _state["loaded"] is not None:
      return _state["loaded"]
    if not _enabled_by_env():
      _state.update(loaded=False, reason="TOPK_NATIVE=0")
      return False
    try:
      path = library_path()
      if not os.path.exists(path):
        _build(path)
      lib = ctypes.cdll.LoadLibrary(path)
      for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
      _state.update(loaded=True, reason=None)
    except Exception as e:  # pylint: disable=broad-except
      _state.update(loaded=False, reason=f"{type(e).__name__}: {e}")
      log.warning("row kernels unavailable, sparse decoding uses XLA's gather (%s)", _state["reason"])
    return _state["loaded"]


def unavailable_reason() -> Optional[str]:
  """Why :func:`available` is False (None when it is True or was not asked yet)."""
  return _state["reason"]


def _native_fits(*arrays: jax.Array) -> bool:
  return (jax.default_backend() == "cpu" and all(a.dtype == jnp.float32 for a in arrays[:2])
          and arrays[2].dtype == jnp.int32)


def _ffi_matvec(x, w, idx):
  x_b = jnp.broadcast_to(x, idx.shape[:-1] + x.shape[-1:])
  return jax.ffi.ffi_call(_TARGETS[0], jax.ShapeDtypeStruct(idx.shape, jnp.float32),
                          vmap_method="sequential")(x_b, w, idx)


def _ffi_vecmat(v, w, idx):
  return jax.ffi.ffi_call(_TARGETS[1], jax.ShapeDtypeStruct(idx.shape[:-1] + w.shape[-1:], jnp.float32),
                          vmap_method="sequential")(v, w, idx)


def _xla_matvec(x, w, idx):
  rows = w.at[idx].get(mode="promise_in_bounds")  # [..., c, d]
  return jnp.einsum("...d,...cd->...c", x, rows)


def _xla_vecmat(v, w, idx):
  rows = w.at[idx].get(mode="promise_in_bounds")  # [..., k, d]
  return jnp.einsum("...k,...kd->...d", v, rows)


def _pallas_matvec(x, w, idx):
  from topk_transformers import pallas_rows  # pylint: disable=g-import-not-at-top
  return pallas_rows.gather_matvec(x, w, idx)


def _pallas_vecmat(v, w, idx):
  from topk_transformers import pallas_rows  # pylint: disable=g-import-not-at-top
  return pallas_rows.gather_vecmat(v, w, idx)


_IMPLEMENTATIONS = {"gather_matvec": {"ffi": _ffi_matvec, "xla": _xla_matvec, "pallas": _pallas_matvec},
                    "gather_vecmat": {"ffi": _ffi_vecmat, "xla": _xla_vecmat, "pallas": _pallas_vecmat}}


def implementation(op: str, a: jax.Array, w: jax.Array, idx: jax.Array, native: Optional[bool] = None) -> str:
  """``"ffi"``, ``"xla"`` or ``"pallas"``: how ``op`` (``gather_matvec`` / ``gather_vecmat``) runs for these operands.

  ``native=False``: XLA's gather; ``True``: the CPU handler (an error where it cannot run). ``None``: the fastest of
  those that apply here, measured on the device (``autotune``): the CPU handler (CPU, float32), XLA's gather, the
  Pallas kernels (GPU, TPU; operands of one dtype). With ``TOPK_AUTOTUNE=0``, the rule measured on the CPU: the
  handler where it applies, else XLA's gather (Pallas is never assumed faster).
  """
  if native is False:
    return "xla"
  fits = _native_fits(a, w, idx)
  if native:
    if not fits:
      raise ValueError("row kernels need the CPU backend, float32 operands and int32 indices")
    if not available():
      raise RuntimeError(f"row kernels unavailable: {unavailable_reason()}")
    return "ffi"
  names = ["ffi"] if fits and available() else []
  names.append("xla")
  from topk_transformers import pallas_rows  # pylint: disable=g-import-not-at-top
  if pallas_rows.platform_for(jax.default_backend()) and a.dtype == w.dtype and pallas_rows.supported(w, idx):
    names.append("pallas")
  if len(names) == 1:
    return names[0]
  from topk_transformers import autotune  # pylint: disable=g-import-not-at-top
  return autotune.row_implementation(op, a.shape, w.shape, idx.shape, w.dtype,
                                     {name: _IMPLEMENTATIONS[op][name] for name in names}, default=names[0])


def gather_matvec(x: jax.Array, w: jax.Array, idx: jax.Array, native: Optional[bool] = None) -> jax.Array:
  """``out[..., j] = x[..., :] . w[idx[..., j], :]``: ``x [..., d]``, ``w [n, d]``, ``idx [..., c]`` in ``[0, n)``.

  ``native``: ``None`` takes the fastest implementation that applies (:func:`implementation`), ``False`` XLA's
  gather, ``True`` the CPU handler (an error where it cannot).
  """
  _check(x, w, idx, "x", x.shape[-1] if x.ndim else None)
  return _IMPLEMENTATIONS["gather_matvec"][implementation("gather_matvec", x, w, idx, native)](x, w, idx)


def gather_vecmat(v: jax.Array, w: jax.Array, idx: jax.Array, native: Optional[bool] = None) -> jax.Array:
  """``out[..., :] = sum_j v[..., j] * w[idx[..., j], :]``: ``v [..., k]``, ``w [n, d]``, ``idx [..., k]`` in ``[0, n)``.

  ``native`` as for :func:`gather_matvec`.
  """
  if v.shape != idx.shape:
    raise ValueError(f"values and idx must have the same shape, got {v.shape} and {idx.shape}")
  _check(v, w, idx, "v", None)
  return _IMPLEMENTATIONS["gather_vecmat"][implementation("gather_vecmat", v, w, idx, native)](v, w, idx)


def _check(a: jax.Array, w: jax.Array, idx: jax.Array, name: str, width: Optional[int]) -> None:
  if w.ndim != 2:
    raise ValueError(f"row kernels need a 2-D [n, d] matrix, got shape {w.shape}")
  if idx.ndim == 0 or a.ndim == 0:
    raise ValueError(f"{name} and idx need a last axis, got shapes {a.shape} and {idx.shape}")
  if width is not None and width != w.shape[1]:
    raise ValueError(f"{name} has width {width}, the rows of w have {w.shape[1]}")
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"idx must be integer, got {idx.dtype}")


def describe() -> str:
  """One line for logs and benchmark JSON: which implementation runs on this machine."""
  return "native (XLA FFI, CPU)" if available() else f"XLA gather ({unavailable_reason()})"
