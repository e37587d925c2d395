#!/usr/bin/env python
"""Unbatched decoding benchmark, dense vs Top-k sparse: topk-bench-decode. See topk_transformers/commands/bench_decode.py."""

import sys

from topk_transformers.commands import bench_decode

if __name__ == "__main__":
  sys.exit(bench_decode.main())
