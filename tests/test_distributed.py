"""The pieces of a multi-process run that one process can check: flags, data shards, the lock, the lost-process line.

The runs themselves, several real processes on loopback, are in ``test_multiprocess.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import seqio

from topk_transformers import distributed, host_data, model_dir_lock
from topk_transformers.commands import common
from topk_transformers.data import seqio_input
from topk_transformers.errors import ConfigError


# ---- flags

def test_the_three_flags_name_the_process_and_leave_the_rest():
  processes, rest = distributed.split_flags(["--gin_file=a.gin", "--coordinator_address=10.0.0.1:1234",
                                             "--process_count", "4", "--process_index=3", "--gin.X=1"])
  assert processes == distributed.Processes("10.0.0.1:1234", 4, 3)
  assert rest == ["--gin_file=a.gin", "--gin.X=1"]
  assert distributed.split_flags(["--gin_file=a.gin"]) == (None, ["--gin_file=a.gin"])


@pytest.mark.parametrize("argv, message", [
    (["--process_count=2"], r"--process_count given without --coordinator_address and --process_index"),
    (["--coordinator_address=h:1", "--process_index=0"], r"without --process_count"),
    (["--coordinator_address=h:1", "--process_count=2", "--process_index=2"],
     r"--process_index=2 is out of range for --process_count=2 \(0 to 1\)"),
    (["--coordinator_address=h:1", "--process_count=2", "--process_index=-1"], r"out of range"),
    (["--coordinator_address=h:1", "--process_count=0", "--process_index=0"], r"--process_count must be >= 1"),
    (["--coordinator_address=h:1", "--process_count=two", "--process_index=0"], r"must be an integer, got 'two'"),
    (["--coordinator_address=nohost", "--process_count=2", "--process_index=0"], r"must be HOST:PORT"),
    (["--coordinator_address=h:1", "--process_count=2", "--process_index=0", "--process_index=1"], r"given twice"),
    (["--process_index"], r"--process_index needs a value"),
])
def test_a_half_given_or_impossible_launch_is_a_config_error(argv, message, monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  with pytest.raises(ConfigError, match=message):
    distributed.split_flags(argv)


def test_the_coordinator_may_come_from_jax_s_variable(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.1.1.1:99")
  assert distributed.split_flags(["--process_count=2", "--process_index=1"])[0] == \
      distributed.Processes("10.1.1.1:99", 2, 1)


def test_a_coordinator_without_a_process_count_is_one_line_exit_2(monkeypatch, capsys):
  """What the issue found: only JAX_COORDINATOR_ADDRESS set was a traceback from jax.distributed.initialize."""
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:12357")
  for name in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert common.command(lambda argv: 0)(["--gin_file=x.gin"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == ["error: JAX_COORDINATOR_ADDRESS is set but this process does not know which of how many it is: "
                 "pass --process_count=N and --process_index=I too"]


def test_every_command_reads_the_flags_before_its_own(capsys):
  from topk_transformers.commands import train  # pylint: disable=g-import-not-at-top
  assert train.main(["--gin_file=t5/runs/cpu_smoke.gin", "--process_count=2"]) == 2
  assert capsys.readouterr().err.startswith("error: --process_count given without")


@pytest.mark.parametrize("env, found", [
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, "TPU pod slice"),
    ({"TPU_WORKER_HOSTNAMES": "t1"}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, "SLURM"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({}, None),
])
def test_the_clusters_that_jax_detects(env, found, monkeypatch):
  for name in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
               "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  cluster = distributed.detected_cluster()
  assert (cluster is None) if found is None else (found in cluster)


# ---- the one line that replaces the runtime's fatal report

WORKER_LOST = textwrap.dedent("""\
    E1206 20:09:18.278997    5447 coordination_service.cc:1549] [909] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
    1
    The tasks have crashed. Check the task logs for an earlier error. [type.googleapis.com/tensorflow.CoordinationServiceError='']
    E1206 20:09:18.279514    5458 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
    F1206 20:09:18.279653    5458 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
    1
    The tasks have crashed.
    *** Check failure stack trace: ***
        @     0x7f4d1ab0cd5b  std::_Function_handler<>::_M_invoke()
    """)
LEADER_LOST = textwrap.dedent("""\
    E1206 20:08:51.924264    5384 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
    F1206 20:08:51.924291    5384 client.h:80] Terminating process because the JAX distributed service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.
    *** Check failure stack trace: ***
    """)


@pytest.mark.parametrize("report, cause", [
    (WORKER_LOST, "process 1 of 3 stopped responding (no heartbeat)"),
    (LEADER_LOST, "process 0 of 3, the coordinator, stopped responding"),
])
def test_the_runtime_s_fatal_report_becomes_one_line_naming_the_lost_process(report, cause):
  """Through the real filter, in a process that then aborts as the runtime's fatal log does."""
  program = textwrap.dedent(f"""\
      import os, sys, time
      from topk_transformers import distributed, startup
      startup.filter_for_good(distributed.RUNTIME_CHATTER, fatal=distributed.TERMINATING,
                              hold=distributed.COORDINATION_ERROR,
                              report="topk_transformers.distributed:lost_process_line", report_args=(2, 3))
      os.write(2, b"a line of the run\\n[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\\n")
      os.write(2, {report.encode()!r})
      os.abort()
      """)
  done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
  assert done.returncode == -6
  assert done.stderr.splitlines() == [
      "a line of the run",
      f"error: [process 2] {cause}; this process stops too. Restart all processes on the same MODEL_DIR: they "
      "resume from the last complete checkpoint"]


@pytest.mark.parametrize("lines", [
    ["[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"],
    # Two threads printing at once: one line holds the start of the other's.
    ["[Gloo] Rank [Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1",
     "1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"],
])
def test_the_collectives_connection_lines_are_dropped_whole_or_interleaved(lines):
  chatter = [re.compile(p) for p in distributed.RUNTIME_CHATTER]
  assert all(any(c.fullmatch(line) for c in chatter) for line in lines)
  for other in ("[Gloo] Rank 1 failed to connect", "step 1/8 | loss 3.0508",
                "1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1 and more"):
    assert not any(c.fullmatch(other) for c in chatter)


def test_a_coordination_error_that_is_not_fatal_still_reaches_the_terminal():
  program = textwrap.dedent("""\
      import os, time
      from topk_transformers import distributed, startup
      startup.filter_for_good((), fatal=distributed.TERMINATING, hold=distributed.COORDINATION_ERROR,
                              report="topk_transformers.distributed:lost_process_line", report_args=(0, 2))
      os.write(2, b"E1206 20:09:18.279514    5458 coordination_service_agent.cc:289] a passing complaint\\n")
      time.sleep(5)
      os.write(2, b"after\\n")
      """)
  done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
  assert done.stderr.splitlines() == [
      "E1206 20:09:18.279514    5458 coordination_service_agent.cc:289] a passing complaint", "after"]


# ---- the MODEL_DIR lock

def test_a_second_holder_of_a_model_dir_is_refused_and_the_lock_ends_with_its_holder(tmp_path):
  with model_dir_lock.ModelDirLock(str(tmp_path), 0):
    # Another process: flock locks belong to open files, so a second open in a child is a second trainer.
    child = subprocess.run([sys.executable, "-c", "from topk_transformers import model_dir_lock as m\n"
                            f"m.ModelDirLock({str(tmp_path)!r}, 0).__enter__()"], capture_output=True, text=True)
    assert child.returncode != 0
    assert f"ConfigError: MODEL_DIR {tmp_path} is in use by a running trainer (pid {os.getpid()} on " in child.stderr
    with model_dir_lock.ModelDirLock(str(tmp_path), 1):  # another process index of the same run
      pass
  with model_dir_lock.ModelDirLock(str(tmp_path), 0):  # released
    pass


# ---- data shards: a numbered corpus

N_LINES = 64


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
  path = tmp_path_factory.mktemp("numbered") / "lines.txt"
  path.write_text("".join(f"{i:04d}\n" for i in range(N_LINES)))
  name = "test_numbered_lines"
  vocab = seqio.ByteVocabulary()
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=seqio.TextLineDataSource({"train": str(path)}),
      preprocessors=[lambda ds: ds.map(lambda line: {"inputs": line, "targets": line}),
                     seqio.preprocessors.tokenize],
      output_features={k: seqio.Feature(vocab, add_eos=False) for k in ("inputs", "targets")})
  yield seqio_input.SeqioDataset(name, {"inputs": 8, "targets": 8}, pack=False, shuffle_buffer_size=16)
  seqio.TaskRegistry.remove(name)


def _line_numbers(batch):
  return [int(bytes((t[t > 0] - 3).astype("uint8").tolist()).decode()) for t in batch["decoder_target_tokens"]]


def _steps(dataset, data_shards, rows, steps, global_batch=8):
  it = host_data.HostBatches(dataset, "train", global_batch, data_shards, rows, seed=7)
  return [_line_numbers(next(it)) for _ in range(steps)]


class InOrder:
  """The dataset with its shuffle off: seqio shuffles after repeating, so a shuffled epoch's edge is blurred."""

  def __init__(self, dataset):
    self.dataset = dataset

  def get_dataset(self, split, batch_size, **kwargs):
    return self.dataset.get_dataset(split, batch_size, **dict(kwargs, shuffle=False))


def test_processes_read_disjoint_slices_and_together_the_epoch_once(numbered):
  steps = N_LINES // 8  # one epoch of the global batches
  first, second = _steps(InOrder(numbered), 2, (0, 4), steps), _steps(InOrder(numbered), 2, (4, 8), steps)
  for a, b in zip(first, second):
    assert len(a) == len(b) == 4 and not set(a) & set(b)  # no line twice within a step
  together = sorted(n for step in first + second for n in step)
  assert together == list(range(N_LINES))  # each line exactly once over the epoch
  alone = sorted(n for step in _steps(InOrder(numbered), 1, (0, 8), steps) for n in step)
  assert alone == together  # the same set that one process reads


def test_shuffled_processes_never_share_a_line(numbered):
  steps = 2 * N_LINES // 8
  first, second = _steps(numbered, 2, (0, 4), steps), _steps(numbered, 2, (4, 8), steps)
  for a, b in zip(first, second):
    assert not set(a) & set(b)
  seen_first, seen_second = {n for s in first for n in s}, {n for s in second for n in s}
  assert not seen_first & seen_second  # each line belongs to one process's shard
  assert seen_first | seen_second == set(range(N_LINES))


def test_the_global_batches_do_not_depend_on_the_process_count(numbered):
  """data_shards=2 read by one process is the concatenation of what two processes read."""
  steps = 12  # past the end of an epoch
  first, second = _steps(numbered, 2, (0, 4), steps), _steps(numbered, 2, (4, 8), steps)
  assert _steps(numbered, 2, (0, 8), steps) == [a + b for a, b in zip(first, second)]


@pytest.mark.parametrize("data_shards, rows, message", [
    (3, (0, 4), r"data_shards=3 does not divide batch_size=8"),
    (1, (0, 4), r"rows 0-3 of the global batch, which are not whole data shards of 8 rows"),
    (0, (0, 8), r"data_shards must be a positive integer"),
])
def test_a_data_layout_the_processes_cannot_split_is_a_config_error(data_shards, rows, message):
  with pytest.raises(ConfigError, match=message):
    host_data.check_layout(8, data_shards, rows)


def test_host_rows_follow_the_mesh():
  from topk_transformers import partitioning  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  part = partitioning.Partitioner(num_partitions=min(2, jax.device_count()))
  assert part.host_rows(16) == (0, 16)  # one process holds every row


# ---- the launcher, with commands that need no JAX

LAUNCH = [sys.executable, "-c", "import sys; from topk_transformers.commands.launch import main; sys.exit(main())"]


def test_the_launcher_names_a_failed_process_and_shows_its_output(tmp_path):
  child = ("import sys, os; i = sys.argv[-1].split('=')[1]; print('flags', *sys.argv[1:]); "
           "print('devices', os.environ['XLA_FLAGS'], file=sys.stderr); sys.exit(3 if i == '1' else 0)")
  done = subprocess.run(LAUNCH + ["--processes=3", "--devices_per_process=2", f"--log_dir={tmp_path}", "--",
                                  sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
  assert done.returncode == 3
  port = re.search(r"coordinator 127\.0\.0\.1:(\d+)", done.stderr).group(1)
  assert f"flags --coordinator_address=127.0.0.1:{port} --process_count=3 --process_index=0" in done.stdout
  assert "topk-launch: [process 1] exited with status 3" in done.stderr
  assert f"[process 1] flags --coordinator_address=127.0.0.1:{port} --process_count=3 --process_index=1" in done.stderr
  assert "[process 1] devices --xla_force_host_platform_device_count=2" in done.stderr
  assert "[process 2]" not in done.stderr  # it succeeded: its output stays in its log
  assert "--process_index=2" in (tmp_path / "process_2.log").read_text()


def test_the_launcher_without_a_command_is_one_line_exit_2():
  done = subprocess.run(LAUNCH + ["--processes=2"], capture_output=True, text=True, timeout=60)
  assert done.returncode == 2
  assert done.stderr.startswith("error: topk-launch: give the command after '--'") and done.stderr.count("\n") == 1


def test_a_killed_launcher_leaves_no_process_behind(tmp_path):
  marker = tmp_path / "alive"
  child = f"import time, pathlib; pathlib.Path({str(marker)!r}).touch(); time.sleep(300)"
  launcher = subprocess.Popen(LAUNCH + ["--processes=2", "--", sys.executable, "-c", child],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while not marker.exists() and time.time() < deadline:
    time.sleep(0.1)
  children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).find(str(marker).encode()) >= 0
              and int(p) != launcher.pid]
  assert len(children) == 2
  launcher.kill()
  launcher.wait()
  deadline = time.time() + 30
  while any(_alive(p) for p in children) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(_alive(p) for p in children)


def _cmdline(pid) -> bytes:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read()
  except OSError:
    return b""


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except OSError:
    return False
