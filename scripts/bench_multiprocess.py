"""The step time of 2 processes x 2 devices against 1 process x 4 devices, the same ('data', 'model') mesh.

  python scripts/bench_multiprocess.py [--steps=60] [--repeats=2] [--out=benchmarks/multiprocess_step_time.json]

Trains the CPU smoke model (``t5/runs/cpu_smoke.gin``, NUM_PARTITIONS=2, ``data_shards=2`` so both read the
same batches) with ``topk-launch``, alternating the two layouts, and reads ``train/steps_per_second`` from process
0's TensorBoard events, leaving out the first logged interval (compilation). It is a figure, not a target: the
2-process run's collectives go over loopback TCP (gloo), the 1-process run's stay in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

RUN = "import sys; from topk_transformers.commands.{0} import main; sys.exit(main())"


def steps_per_second(model_dir: str) -> list:
  from topk_transformers import metrics  # pylint: disable=g-import-not-at-top
  values = metrics.read_scalars(model_dir, "train/steps_per_second")
  return [values[s] for s in sorted(values)][1:]  # the first interval compiles


def run_once(processes: int, devices: int, steps: int, log_period: int) -> dict:
  model_dir = tempfile.mkdtemp(prefix=f"bench_mp_{processes}x{devices}_")
  command = [sys.executable, "-c", RUN.format("launch"), f"--processes={processes}", f"--devices_per_process={devices}",
             "--", sys.executable, "-c", RUN.format("train"), "--gin_file=t5/runs/cpu_smoke.gin",
             f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}", "--gin.NUM_PARTITIONS=2",
             f"--gin.train.train.log_period={log_period}", "--gin.train.train.eval_period=0",
             f"--gin.train.train.checkpoint_period={steps}", "--gin.train.train.data_shards=2",
             "--gin.train.train.end_of_training=None"]
  start = time.time()
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"{processes}x{devices} failed ({done.returncode}):\n{done.stderr[-3000:]}")
  rates = steps_per_second(model_dir)
  return {"processes": processes, "devices_per_process": devices, "steps_per_second": rates,
          "median_step_ms": 1000.0 / statistics.median(rates), "wall_s": time.time() - start}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--log_period", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", default="benchmarks/multiprocess_step_time.json")
  args = parser.parse_args()
  load_before = os.getloadavg()
  runs = []
  for repeat in range(args.repeats):
    for processes, devices in ((1, 4), (2, 2)):
      runs.append(dict(run_once(processes, devices, args.steps, args.log_period), repeat=repeat))
      print(f"{processes} x {devices}: {runs[-1]['median_step_ms']:.1f} ms/step", flush=True)
  median = lambda p: statistics.median(r["median_step_ms"] for r in runs if r["processes"] == p)
  result = {
      "what": "train step time, T5 cpu_smoke (1.97 M params), mesh data 2 x model 2, batch 16, same batches",
      "command": "python scripts/bench_multiprocess.py " + " ".join(sys.argv[1:]),
      "load_average_before": load_before, "load_average_after": os.getloadavg(),
      "one_process_ms": median(1), "two_processes_ms": median(2), "ratio_two_over_one": median(2) / median(1),
      "runs": runs,
  }
  print(f"2 processes x 2 devices: {result['two_processes_ms']:.1f} ms/step; 1 process x 4 devices: "
        f"{result['one_process_ms']:.1f} ms/step; ratio {result['ratio_two_over_one']:.2f}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
