"""The published T5 shapes as Python, for code that must run without gin (the benchmarks on a bare GPU box).

The gin files ``configs/t5/t5_1_0/*.gin`` and ``configs/t5/t5_1_1/*.gin`` are the
configurations users stack; ``tests/test_t5_configs.py`` checks that this table
gives the same ``T5Config`` as each of them. v1.1's 3B and 11B are its XL and XXL.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

from topk_transformers.t5 import network

# (emb_dim, num_heads, head_dim, num_layers (each stack), mlp_dim)
_SHAPES: Dict[str, Dict[str, Tuple[int, int, int, int, int]]] = {
    "1.0": {"tiny": (64, 2, 32, 2, 256), "small": (512, 8, 64, 6, 2048), "base": (768, 12, 64, 12, 3072),
            "large": (1024, 16, 64, 24, 4096), "3B": (1024, 32, 128, 24, 16384),
            "11B": (1024, 128, 128, 24, 65536)},
    "1.1": {"tiny": (64, 2, 32, 2, 256), "small": (512, 6, 64, 8, 1024), "base": (768, 12, 64, 12, 2048),
            "large": (1024, 16, 64, 24, 2816), "3B": (2048, 32, 64, 24, 5120), "11B": (4096, 64, 64, 24, 10240)},
}
GIN_NAMES = {"1.0": {s: f"t5/t5_1_0/{s}.gin" for s in _SHAPES["1.0"]},
             "1.1": {"tiny": "t5/t5_1_1/tiny.gin", "small": "t5/t5_1_1/small.gin", "base": "t5/t5_1_1/base.gin",
                     "large": "t5/t5_1_1/large.gin", "3B": "t5/t5_1_1/xl.gin", "11B": "t5/t5_1_1/xxl.gin"}}
VERSIONS = tuple(_SHAPES)
NUM_EMBEDDINGS = 32128  # the 32100-piece vocabulary rounded up to a multiple of 128


def sizes(version: str) -> Tuple[str, ...]:
  if version not in _SHAPES:
    raise ValueError(f"T5 version must be one of {VERSIONS}, got {version!r}")
  return tuple(_SHAPES[version])


def published_config(version: str, size: str, **overrides) -> network.T5Config:
  """The ``T5Config`` of a published size (dense; the gin files' defaults), with ``overrides`` applied."""
  if size not in sizes(version):
    raise ValueError(f"unknown T5 v{version} size {size!r}; choose from {', '.join(sizes(version))}")
  emb, heads, head_dim, layers, mlp = _SHAPES[version][size]
  v11 = version == "1.1"
  config = network.T5Config(
      vocab_size=NUM_EMBEDDINGS, dtype="float32" if size == "tiny" else "bfloat16", emb_dim=emb, num_heads=heads,
      num_encoder_layers=layers, num_decoder_layers=layers, head_dim=head_dim, mlp_dim=mlp,
      mlp_activations=("gelu", "linear") if v11 else ("relu",), dropout_rate=0.0 if v11 else 0.1,
      logits_via_embedding=not v11, float32_attention_logits=False)
  return dataclasses.replace(config, **overrides)
