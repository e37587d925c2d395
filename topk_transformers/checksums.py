"""Checksums of the arrays of a checkpoint: computed where the arrays live, independent of their sharding.

jax and numpy only, so the core (``t5/convert.py``'s project checkpoints) records the same checksums as the
trainer (``checkpoints.py``, which verifies them at every restore).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def key_str(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


CHECKSUMS = "checksums"  # the orbax item (a JSON file) saved beside "state" in every step
FORMAT = "topk-fingerprint-v1"


def _words(x: jax.Array) -> jax.Array:
  """The array's bytes as a flat vector of uint32 (one word per element of 1, 2 or 4 bytes)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  if x.dtype.itemsize == 8:  # bitcast to a narrower type adds a trailing axis of 2 words
    return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1)
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _fingerprint(x: jax.Array):
  """Two 32-bit sums over the array's words, and whether every element is finite.

  Computed where the array lives, by XLA: integer sums are exact in any order, so the result does not depend on
  the sharding, the device kind or the number of hosts, and nothing is copied to the host. Each sum alone changes
  for any change of one word (an odd multiplier, a bijective mix); the pair, one linear and one not, makes a
  multi-word change that leaves both unchanged a ~2^-64 coincidence.
  """
  w = _words(x)
  i = jnp.arange(w.shape[0], dtype=jnp.uint32)
  linear = jnp.sum(w * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  h = w ^ (i * jnp.uint32(0x9E3779B9))
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)  # murmur3's finaliser
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  mixed = jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)
  return linear, mixed, finite


_fingerprints = jax.jit(lambda tree: jax.tree_util.tree_map(_fingerprint, tree))


def _host(x) -> Any:
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)  # replicated scalars


def fingerprints(tree: Any) -> dict:
  """``{array name: {"shape", "dtype", "checksum", "finite"}}`` of a tree of arrays (names as ``a/b/c``)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = [jnp.asarray(x) if not isinstance(x, jax.Array) else x for _, x in leaves]
  sums = jax.tree_util.tree_map(_host, _fingerprints(arrays))
  return {key_str(p): {"shape": list(np.shape(x)), "dtype": str(x.dtype),
                        "checksum": f"{int(linear):08x}{int(mixed):08x}", "finite": bool(finite)}
          for (p, _), x, (linear, mixed, finite) in zip(leaves, arrays, sums)}


def record(tree: Any, step: int) -> dict:
  """The ``checksums`` item saved beside a checkpoint's arrays (what ``checkpoints.verify`` reads)."""
  arrays = {name: {k: v for k, v in f.items() if k != "finite"} for name, f in fingerprints(tree).items()}
  return {"format": FORMAT, "step": int(step), "arrays": arrays}
