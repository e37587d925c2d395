#!/usr/bin/env bash
# The device check of issue #24: Pallas row kernels compiled for the device, topk-bench-train (T5 v1.0 Base and
# Large, bfloat16, MFU) and topk-bench-decode (T5 v1.0 Large, 24 decoder layers, bytes/s against the memory
# bandwidth), with the autotune cache it produced; JSON under OUT_DIR. At most ~8 minutes on one H100.
#
#   benchmarks/device_check.sh OUT_DIR            # on the GPU / TPU
#   benchmarks/device_check.sh OUT_DIR --smoke    # tiny shapes, any machine (the CPU: about two minutes)
#
# Needs jax and flax only (pip install -e '.[gpu]', or a clone with jax[cuda12] and flax): it runs from the clone.
# See topk_transformers/benchmarks/device_check.py and docs/design/autotune_and_kernels.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m topk_transformers.benchmarks.device_check "$@"
