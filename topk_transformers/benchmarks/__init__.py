"""Benchmarks as library code: each prints what it measured and returns (and writes) JSON.

``decoding.py`` (``topk-bench-decode``) and ``training.py`` (``topk-bench-train``)
need only jax, flax and optax, so they run unchanged on a bare GPU or TPU machine.
"""
