"""Multi-process runs for real: several processes on loopback ports, JAX's CPU collectives between them.

Each launch starts real ``topk-train`` processes (through ``topk-launch``, or by hand with SLURM's variables), on
ports they pick themselves, with the toy model: a ``('data', 'model')`` mesh of 2 x 2 over 2 processes. The
scenario runs once per module and the tests read what it left:

* ``reference``: 2 processes, 8 steps, uninterrupted.
* ``interrupted``: the same run, process 1 SIGKILLed mid-run, then a SIGTERM to all (a preemption) while a second
  trainer tries the same directory, then the newest checkpoint's shard-1 data position damaged, then run to the
  end with ``resume_from_readable``.
* ``one_process``: 1 process with 4 devices, ``data_shards=2``, the same mesh: the same global batches.
* ``two_to_one``: the reference's step-4 checkpoint resumed in 1 process.
* ``one_to_two``: ``one_process``'s step-4 checkpoint resumed in 2 processes that SLURM's variables describe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import toy

pytestmark = pytest.mark.slow

TESTS = os.path.dirname(os.path.abspath(__file__))
STEPS = 8
RUN = "import sys; from topk_transformers.commands.{0} import main; sys.exit(main())"
GIN = toy.train_gin("from topk_transformers import partitioning\nNUM_PARTITIONS = 2\n"
                    "partitioning.Partitioner.num_partitions = %NUM_PARTITIONS\ntoy.ToyModel.module = @toy.ToyNet()",
                    partitioner="@partitioning.Partitioner()", log_period="1", checkpoint_period="2",
                    keep_checkpoints="None")


def env(**extra):
  e = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
           TOPK_HEARTBEAT_TIMEOUT_S="10", JAX_PLATFORMS="cpu", TOPK_AUTOTUNE="0")
  e.update(extra)
  return e


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_command(gin_file, model_dir, *flags):
  return [sys.executable, "-c", RUN.format("train"), f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={STEPS}", *flags]


def launch(gin_file, model_dir, *flags, processes=2, devices=2, log_dir):
  """``topk-launch`` of ``processes`` x ``devices``, started (not waited for)."""
  return subprocess.Popen([sys.executable, "-c", RUN.format("launch"), f"--processes={processes}",
                           f"--devices_per_process={devices}", f"--log_dir={log_dir}", "--",
                           *train_command(gin_file, model_dir, *flags)], env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc, timeout=240):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    raise AssertionError(f"timed out; stderr:\n{err[-3000:]}")
  return proc.returncode, out, err


def pid_of(model_dir, index, timeout=120):
  """The pid of process ``index`` of the run on ``model_dir`` (from /proc)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    for pid in os.listdir("/proc"):
      if pid.isdigit():
        try:
          cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
          continue
        if f"--gin.MODEL_DIR='{model_dir}'".encode() in cmd and f"--process_index={index}".encode() in cmd:
          return int(pid)
    time.sleep(0.2)
  raise AssertionError(f"no process {index} for {model_dir}")


def wait_for_checkpoint(model_dir, at_least, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = committed_steps(model_dir)
    if steps and max(steps) >= at_least:
      return max(steps)
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint >= {at_least} in {model_dir}")


def committed_steps(model_dir):
  d = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.exists(os.path.join(d, n, "commit_success.txt")))


def checksums(model_dir, step):
  """The checkpoint's fingerprints of every array (params, optimizer state, step): equal iff bit-identical."""
  with open(os.path.join(model_dir, "checkpoints", str(step), "checksums", "metadata")) as f:
    return json.load(f)["arrays"]


def params(model_dir, step):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
  args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=args)["params"]


def losses(model_dir):
  """``{step: train/loss}`` from process 0's TensorBoard events, at full precision."""
  from topk_transformers import metrics  # pylint: disable=g-import-not-at-top
  return metrics.read_scalars(str(model_dir), "train/loss")


def kill_processes_under(root):
  """SIGKILLs every process whose command line names a path under ``root`` (what a failed scenario left)."""
  for pid in os.listdir("/proc"):
    if pid.isdigit() and int(pid) != os.getpid():
      try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
      except OSError:
        continue
      if str(root).encode() in cmd:
        try:
          os.kill(int(pid), signal.SIGKILL)
        except OSError:
          pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("pods")
  try:
    yield _scenario(root)
  finally:
    kill_processes_under(root)


def _scenario(root):
  gin_file = root / "toy.gin"
  gin_file.write_text(GIN)
  r = {"root": root}

  # ---- reference: 2 processes, uninterrupted, through the launcher
  ref = root / "reference"
  r["reference"] = (ref,) + finish(launch(gin_file, ref, log_dir=root / "logs_ref"))

  # ---- interrupted: process 1 killed, then a preemption, then a damaged data position
  run = root / "interrupted"
  proc = launch(gin_file, run, "--gin.train.train.checkpoint_period=1", "--gin.TRAIN_STEPS=1000",
                log_dir=root / "logs_int1")
  wait_for_checkpoint(run, 2)
  killed_at = time.time()
  os.kill(pid_of(run, 1), signal.SIGKILL)
  r["lost"] = finish(proc) + (time.time() - killed_at,)

  proc = launch(gin_file, run, "--gin.TRAIN_STEPS=1000", log_dir=root / "logs_int2")
  wait_for_checkpoint(run, max(committed_steps(run)) + 2)
  second = subprocess.run(train_command(gin_file, run), capture_output=True, text=True, timeout=240,
                          env=env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  r["second_trainer"] = second
  os.killpg(proc.pid, signal.SIGTERM)  # the launcher passes it on to both processes
  r["preempted"] = finish(proc) + (committed_steps(run),)

  newest = max(committed_steps(run))
  r["damaged_step"] = newest
  data_file = next(p for p in (run / "checkpoints_data" / str(newest)).iterdir() if p.name.startswith("shard_1.data"))
  data_file.write_bytes(b"\0" * data_file.stat().st_size)
  r["resumed"] = finish(launch(gin_file, run, "--gin.train.train.resume_from_readable=True",
                               log_dir=root / "logs_int3")) + (run,)

  # ---- one process, 4 devices, the same mesh and global batches
  one = root / "one_process"
  r["one_process"] = (one,) + finish(launch(gin_file, one, "--gin.train.train.data_shards=2", processes=1,
                                            devices=4, log_dir=root / "logs_one"))
  return r


def test_two_processes_train_and_only_process_0_speaks(runs):
  ref, status, out, err = runs["reference"]
  assert status == 0, err[-3000:]
  assert committed_steps(ref)[-1] == STEPS
  assert re.findall(r"^step (\d+)/8 ", out, re.M) == [str(s) for s in range(1, STEPS + 1)]  # process 0 alone
  assert "mesh {'data': 2, 'model': 2}" in err
  assert "[process 1]" not in err and "Gloo" not in out + err
  log = (runs["root"] / "logs_ref" / "process_1.log").read_text()
  assert "step 1/8" not in log and "Traceback" not in log


def test_a_lost_process_stops_the_other_with_one_line_naming_it(runs):
  status, _, err, seconds = runs["lost"]
  assert status == 128 + signal.SIGKILL  # the launcher reports the first failure
  assert "topk-launch: [process 1] was killed by SIGKILL" in err
  lost = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lost) == 1, err[-3000:]
  assert re.match(r"error: \[process 0\] process 1 of 2 stopped responding", lost[0]), lost
  assert "Traceback" not in err and "Check failure" not in err
  assert seconds < 120


def test_a_second_trainer_on_a_live_run_is_refused_with_one_line(runs):
  second = runs["second_trainer"]
  assert second.returncode == 2
  assert re.fullmatch(r"error: MODEL_DIR \S+ is in use by a running trainer \(pid \d+ on .*\); .*\n",
                      second.stderr), second.stderr


def test_sigterm_to_all_writes_one_checkpoint_at_a_step_they_agree_on(runs):
  status, _, err, steps = runs["preempted"]
  assert status == 143, err[-3000:]
  stops = re.findall(r"stopped by SIGTERM at step (\d+)", err)
  assert len(stops) == 1  # process 0's; process 1 exited 143 too, quietly
  assert "topk-launch: [process 1] exited with status 143" in err
  assert int(stops[0]) == max(steps)


def test_resume_after_kills_and_preemption_is_bit_identical(runs):
  status, out, err, run = runs["resumed"]
  ref = runs["reference"][0]
  assert status == 0, err[-3000:]
  damaged = runs["damaged_step"]
  # Both processes skipped the step whose shard-1 position only process 1 reads; process 0 moved it aside once.
  assert f"moved unreadable checkpoint step {damaged}" in err
  assert (run / "checkpoints_unreadable" / str(damaged)).is_dir()
  assert not (run / "checkpoints_unreadable" / f"{damaged}.2").exists()
  assert checksums(run, STEPS) == checksums(ref, STEPS)


def test_one_process_with_the_same_mesh_trains_to_the_same_losses(runs):
  one, status, _, err = runs["one_process"]
  assert status == 0, err[-3000:]
  assert "mesh {'data': 2, 'model': 2}" in err
  ref_losses, one_losses = losses(runs["reference"][0]), losses(one)
  assert sorted(ref_losses) == sorted(one_losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([one_losses[s] for s in range(1, STEPS + 1)],
                             [ref_losses[s] for s in range(1, STEPS + 1)], rtol=2e-5, atol=1e-6)


def copy_until(run, dst, step):
  """A copy of ``run`` whose newest checkpoint is ``step`` (TensorBoard events and the lock left out)."""
  shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock*", "events.out*"))
  for later in committed_steps(run):
    if later > step:
      shutil.rmtree(dst / "checkpoints" / str(later))
  return dst


def assert_params_close(run_a, run_b, step=STEPS):
  """Equal up to the order of the cross-process sums."""
  for (name, a), (_, b) in zip(*(sorted(_flat(params(d, step)).items()) for d in (run_a, run_b))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
  ref = runs["reference"][0]
  run = copy_until(ref, tmp_path / "two_to_one", 4)
  done = subprocess.run(train_command(runs["root"] / "toy.gin", run), capture_output=True, text=True, timeout=240,
                        env=env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Restored step 4" in done.stderr
  assert "starts over" not in done.stderr  # data_shards=2 recorded: one process reads both shards, in order
  assert_params_close(ref, run)


def test_a_one_process_checkpoint_resumes_in_two_processes_that_slurm_describes(runs, tmp_path):
  one = runs["one_process"][0]
  run = copy_until(one, tmp_path / "one_to_two", 4)
  port = free_port()
  procs = [subprocess.Popen(train_command(runs["root"] / "toy.gin", run), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                                    SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port),
                                    XLA_FLAGS="--xla_force_host_platform_device_count=2"))
           for i in range(2)]
  results = [finish(p) for p in procs]
  assert [s for s, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
  assert "multi-process run: 2 processes, 4 devices (a SLURM job" in results[0][2]
  assert "Restored step 4" in results[0][2]
  assert_params_close(one, run)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out
