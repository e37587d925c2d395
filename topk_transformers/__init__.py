"""topk-transformers: Top-k T5 and Top-k ViT (Li et al., 2022) in JAX / Flax.

``from topk_transformers import topk`` gives the Top-k activation module
(``topk.topk(x, k)``, ``topk.select``); ``layers.MlpBlock(top_k=...)`` is the MLP
every model uses.
"""

__version__ = "0.1.0"
