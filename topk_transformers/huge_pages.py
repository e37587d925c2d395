"""Back weights with 2 MiB pages on Linux CPUs (transparent huge pages, ``madvise(MADV_COLLAPSE)``).

A decoding step that reads scattered rows of ``[mlp, embed]`` matrices touches one 4 KiB page per row of T5-Large
(1024 float32 values): each row read is then also a TLB miss and a page walk. On 2 MiB pages the same rows share a
few hundred TLB entries. NumPy already asks for huge pages for its large allocations, but buffers that XLA allocates
(for example the transposed ``wi_rows`` of ``predictors.prepare``) come from ``malloc`` on 4 KiB pages unless the
system's THP mode is ``always``.

``back(tree)`` asks the kernel to move every 2 MiB-aligned stretch of each CPU array's buffer onto huge pages now
(``MADV_COLLAPSE``, Linux 6.1+). The data do not change: the kernel copies the pages and remaps them. Elsewhere
(another OS, an accelerator, an older kernel, THP set to ``never``) it does nothing and says why once. Set
``TOPK_HUGE_PAGES=0`` to turn it off.
"""

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any, Dict

import jax
import numpy as np

MADV_COLLAPSE = 25
"""``<linux/mman.h>``: collapse the range onto transparent huge pages, synchronously (Linux 6.1)."""
HUGE_PAGE = 2 << 20
_logged = set()


def _say_once(message: str) -> None:
  if message not in _logged:
    _logged.add(message)
    logging.info("huge pages: %s", message)


def _madvise():
  if not sys.platform.startswith("linux"):
    return None, f"not on Linux ({sys.platform})"
  if os.environ.get("TOPK_HUGE_PAGES", "1") == "0":
    return None, "TOPK_HUGE_PAGES=0"
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
      if "[never]" in f.read():
        return None, "transparent huge pages are set to never"
  except OSError:
    return None, "this kernel has no transparent huge pages"
  libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  libc.madvise.restype = ctypes.c_int
  return libc.madvise, ""


def _buffers(tree: Any):
  """``(address, nbytes)`` of each CPU buffer in ``tree`` (jax arrays on one CPU device, NumPy arrays)."""
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, np.ndarray):
      yield leaf.ctypes.data, leaf.nbytes
    elif isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
      devices = leaf.devices()
      if len(devices) == 1 and next(iter(devices)).platform == "cpu" and leaf.is_fully_addressable:
        yield leaf.unsafe_buffer_pointer(), leaf.nbytes


def back(tree: Any) -> Dict[str, int]:
  """Moves the 2 MiB-aligned interior of every CPU buffer in ``tree`` onto huge pages; returns byte counts.

  ``{"bytes": all the buffers' bytes, "eligible": the bytes inside whole aligned 2 MiB pages, "backed": those the
  kernel collapsed}``. Arrays below 2 MiB have no whole aligned page and are left as they are. Never raises for a
  kernel that refuses: it logs the reason once and counts nothing as backed.
  """
  madvise, why = _madvise()
  total = eligible = backed = 0
  errors = set()
  for address, nbytes in _buffers(tree):
    total += nbytes
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
      continue
    eligible += end - start
    if madvise is None:
      continue
    if madvise(start, end - start, MADV_COLLAPSE) == 0:
      backed += end - start
    else:
      errors.add(os.strerror(ctypes.get_errno()))
  if madvise is None:
    _say_once(f"left on the system's pages: {why}")
  elif errors:
    _say_once(f"madvise(MADV_COLLAPSE) refused some buffers: {', '.join(sorted(errors))}")
  return {"bytes": total, "eligible": eligible, "backed": backed}
