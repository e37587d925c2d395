"""Claims the README makes that no other test pins: each test fails if its claim is false.

- ``k >= d_ff`` keeps every unit and logs one line saying so (once per width);
- ``t5/runs/pretrain_c4.gin`` loads and pins T5's recipe: Adafactor, the rsqrt
  schedule, 2^19 steps, batch 128, packing, 512/114 tokens (no data is built);
  ``t5/runs/finetune.gin`` pins T5X's fine-tuning recipe the same way, and both
  take their optimizer, mesh and ``train.train`` block from ``runs/base_train.gin``;
- ``SeqioDataset`` packs examples into rows with segment ids and positions, and
  ``ShardInfo`` gives each host a disjoint slice that together cover the split;
- ``KEEP_CHECKPOINTS`` keeps the newest N checkpoints and prunes the data-iterator
  states of the others (``PARAMETER_SHARDING='2d'`` is in test_sharding.py, which shares
  one 8-device subprocess between its tests);
- ``topk-train`` run as a console script exits 2 for a configuration mistake, 1
  for a NaN loss or an unreadable checkpoint (one ``error:`` line each), and 143
  after SIGTERM with the checkpoint written; Ctrl-C (SIGINT) writes it too, exits 130,
  and the same command resumes from that step.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from topk_transformers import checkpoints, gin_utils, runs, topk
from topk_transformers.data import seqio_input
import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


# ---------------------------------------------------------------------------
# k >= d_ff
# ---------------------------------------------------------------------------


def test_k_at_least_d_ff_returns_the_input_and_logs_one_line(monkeypatch, caplog):
  monkeypatch.setattr(topk, "_logged_noop", set())
  x = jnp.arange(12.0).reshape(2, 6) - 4.0
  with caplog.at_level(logging.INFO):
    for k in (6, 6, 9):
      assert topk.topk(x, k) is x
    assert topk.topk(x, 5) is not x  # k < d_ff is a Top-k
    assert not topk.is_active(None, 6) and not topk.is_active(6, 6) and topk.is_active(5, 6)
  lines = [r.getMessage() for r in caplog.records if "keeps every unit" in r.getMessage()]
  assert lines == ["top_k=6 >= mlp width 6: Top-k keeps every unit, the MLP is vanilla.",
                   "top_k=9 >= mlp width 6: Top-k keeps every unit, the MLP is vanilla."]


# ---------------------------------------------------------------------------
# pretrain_c4.gin
# ---------------------------------------------------------------------------


def test_pretrain_c4_config_loads_and_pins_t5s_recipe():
  try:
    gin_utils.configure(["t5/t5_1_0/base.gin", "t5/topk.gin", "t5/runs/pretrain_c4.gin"],
                        ["MODEL_DIR = '/nonexistent'"])
    assert gin_utils.get_macro("TRAIN_STEPS") == 2 ** 19
    assert gin_utils.get_macro("BATCH_SIZE") == 128
    assert gin_utils.get_macro("KEEP_CHECKPOINTS") == 3
    for name, value in (("batch_size", 128), ("train_steps", 2 ** 19), ("keep_checkpoints", 3)):
      assert runs.build_from_gin(f"train.train.{name}") == value, name  # the macros reach the trainer
    optimizer = gin.query_parameter("train.train.optimizer")
    assert optimizer.selector == "optax.adafactor" and not optimizer.evaluate
    assert (gin.query_parameter("optax.adafactor.decay_rate"), gin.query_parameter("optax.adafactor.factored"),
            gin.query_parameter("optax.adafactor.multiply_by_parameter_scale"),
            gin.query_parameter("optax.adafactor.clipping_threshold")) == (0.8, True, True, 1.0)
    # T5's inverse square root schedule: 1/sqrt(max(step, 10^4)).
    schedule = runs.build_from_gin("train.train.learning_rate")
    for step, lr in ((0, 0.01), (10_000, 0.01), (40_000, 0.005), (2 ** 19, 2 ** -9.5)):
      np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)
    dataset = runs.build_from_gin("train.train.dataset")
    assert isinstance(dataset, seqio_input.SeqioDataset) and dataset.pack
    assert dataset.mixture_or_task_name == "c4_span_corruption"
    assert dataset.task_feature_lengths == {"inputs": 512, "targets": 114}
    assert (dataset.train_split, dataset.eval_split) == ("train", "validation")
    assert gin.query_parameter("tasks.register_c4_span_corruption.noise_density") == 0.15
    assert gin.query_parameter("tasks.register_c4_span_corruption.mean_noise_span_length") == 3.0
    model = gin_utils.get_macro("MODEL")
    assert model.module.config.top_k is not None and model.module.config.emb_dim == 768
    assert gin_utils.get_macro("PARAMETER_SHARDING") == "1d"
  finally:
    gin.clear_config()


def test_finetune_config_pins_t5xs_finetuning_recipe():
  """runs/finetune.gin shares base_train.gin with pretrain_c4.gin; what it binds of its own reaches the trainer."""
  try:
    gin_utils.configure(["t5/t5_1_0/base.gin", "t5/topk.gin", "t5/runs/finetune.gin"],
                        ["MODEL_DIR = '/nonexistent'", "INITIAL_CHECKPOINT_PATH = '/ckpt'",
                         "MIXTURE_OR_TASK_NAME = 'glue_sst2_v2'", "VOCABULARY_PATH = '/spiece.model'", "EXTRA_IDS = 100"])
    expected = dict(model_dir="/nonexistent", train_steps=2 ** 18, batch_size=128, eval_period=1000, eval_steps=20,
                    log_period=100, checkpoint_period=5000, keep_checkpoints=None, seed=0,
                    initial_checkpoint_path="/ckpt", initial_checkpoint_format="auto")
    for name, value in expected.items():
      assert runs.build_from_gin(f"train.train.{name}") == value, name
    optimizer = gin.query_parameter("train.train.optimizer")
    assert optimizer.selector == "optax.adafactor" and not optimizer.evaluate
    assert (gin.query_parameter("optax.adafactor.decay_rate"), gin.query_parameter("optax.adafactor.factored"),
            gin.query_parameter("optax.adafactor.multiply_by_parameter_scale"),
            gin.query_parameter("optax.adafactor.clipping_threshold"),
            gin.query_parameter("optax.adafactor.min_dim_size_to_factor")) == (0.8, True, True, 1.0, 128)
    schedule = runs.build_from_gin("train.train.learning_rate")  # constant 1e-3, no warm-up
    for step in (0, 1, 10_000, 2 ** 18):
      np.testing.assert_allclose(float(schedule(step)), 1e-3, rtol=1e-6)
    dataset = runs.build_from_gin("train.train.dataset")
    assert isinstance(dataset, seqio_input.SeqioDataset) and dataset.pack
    assert dataset.mixture_or_task_name == "glue_sst2_v2"
    assert dataset.task_feature_lengths == {"inputs": 512, "targets": 16}
    assert (dataset.train_split, dataset.eval_split) == ("train", "validation")
    assert runs.build_from_gin("tasks.register_glue_task.vocabulary_path") == "/spiece.model"
    partitioner = runs.build_from_gin("train.train.partitioner")
    assert partitioner.num_partitions == 1 and gin_utils.get_macro("PARAMETER_SHARDING") == "1d"
    model = gin_utils.get_macro("MODEL")
    assert model.module.config.dropout_rate == 0.1 and model.module.config.top_k is not None
  finally:
    gin.clear_config()


def test_pretrain_and_finetune_share_one_train_block():
  """The optimizer, mesh and train.train bindings come from runs/base_train.gin, not copies of it."""
  for name in ("pretrain_c4", "finetune"):
    with open(os.path.join(ROOT, "configs", "t5", "runs", f"{name}.gin"), encoding="utf-8") as f:
      text = f.read()
    assert "include 't5/runs/base_train.gin'" in text
    for shared in ("optax.adafactor:", "partitioning.Partitioner:", "seqio_input.SeqioDataset:", "model_dir ="):
      assert shared not in text, (name, shared)


# ---------------------------------------------------------------------------
# SeqioDataset: packing and ShardInfo
# ---------------------------------------------------------------------------

_EXAMPLES = [dict(inputs=[10 + i] * (2 + i % 3), targets=[50 + i] * (1 + i % 2)) for i in range(12)]


def _register_toy_task():
  name = "claims_toy_task"
  seqio.TaskRegistry.remove(name)

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_generator(
        lambda: iter(_EXAMPLES), output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                                                  "targets": tf.TensorSpec([None], tf.int32)})

  vocab = seqio.PassThroughVocabulary(size=128, eos_id=1)
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"]),
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(vocab, add_eos=True), "targets": seqio.Feature(vocab, add_eos=True)})
  return name


def _segments(row, ids):
  """The token lists of the packed segments of one row (padding dropped)."""
  return [row[ids == s].tolist() for s in range(1, int(ids.max()) + 1)]


def test_seqio_dataset_packs_examples_and_shards_them_disjointly_over_hosts():
  name = _register_toy_task()
  try:
    lengths = {"inputs": 12, "targets": 6}
    seen = {}
    for shard in range(2):
      ds = seqio_input.SeqioDataset(name, lengths, pack=True)
      batches = list(ds.get_dataset("train", 4, shard_id=shard, num_shards=2, shuffle=False,
                                    repeat=False).as_numpy_iterator())
      examples = []
      for b in batches:
        assert b["encoder_input_tokens"].shape == (4, 12) and b["decoder_target_tokens"].shape == (4, 6)
        for r in range(4):
          enc, enc_ids = b["encoder_input_tokens"][r], b["encoder_segment_ids"][r]
          tgt, tgt_ids = b["decoder_target_tokens"][r], b["decoder_segment_ids"][r]
          if not enc_ids.any():
            continue  # a padding row of the last batch
          # positions restart at 0 in every segment; the decoder input is the target shifted within it
          for s in range(1, int(enc_ids.max()) + 1):
            np.testing.assert_array_equal(b["encoder_positions"][r][enc_ids == s], np.arange((enc_ids == s).sum()))
            dec_in = b["decoder_input_tokens"][r][tgt_ids == s]
            np.testing.assert_array_equal(dec_in, np.concatenate([[0], tgt[tgt_ids == s][:-1]]))
          examples += list(zip(map(tuple, _segments(enc, enc_ids)), map(tuple, _segments(tgt, tgt_ids))))
        assert b["encoder_segment_ids"].max() >= 2  # several examples share a row
      seen[shard] = examples
    want = {(tuple(e["inputs"] + [1]), tuple(e["targets"] + [1])) for e in _EXAMPLES}  # EOS appended
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(want)
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    unpacked = next(seqio_input.SeqioDataset(name, lengths, pack=False).get_dataset(
        "train", 4, shuffle=False, repeat=False).as_numpy_iterator())
    assert "encoder_segment_ids" not in unpacked
  finally:
    seqio.TaskRegistry.remove(name)


# ---------------------------------------------------------------------------
# KEEP_CHECKPOINTS
# ---------------------------------------------------------------------------


def test_keep_checkpoints_prunes_old_steps_and_their_data_iterator_states(tmp_path):
  manager = checkpoints.CheckpointManager(str(tmp_path), keep=2, async_save=False)
  state = {"w": jnp.arange(4.0)}
  it = iter(tf.data.Dataset.range(100))
  for step in (1, 2, 3, 4):
    next(it)
    manager.save(step, jax.tree_util.tree_map(lambda a, s=step: a + s, state), data_iterator=it)
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [3, 4]
  assert sorted(os.listdir(tmp_path / "checkpoints_data")) == ["3", "4"]
  assert sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == ["3", "4"]
  manager.close()
  resumed = iter(tf.data.Dataset.range(100))
  restored = checkpoints.CheckpointManager(str(tmp_path), keep=2, async_save=False).restore_latest(
      jax.eval_shape(lambda: state), {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])},
      data_iterator=resumed)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0) + 4)
  assert int(next(resumed)) == 4  # four elements were consumed before step 4's save
  unlimited = checkpoints.CheckpointManager(str(tmp_path / "all"), keep=None, async_save=False)
  for step in (1, 2, 3, 4):
    unlimited.save(step, state, data_iterator=it)
  unlimited.wait_until_finished()
  assert sorted(unlimited.all_steps()) == [1, 2, 3, 4]
  assert sorted(os.listdir(tmp_path / "all" / "checkpoints_data")) == ["1", "2", "3", "4"]


# ---------------------------------------------------------------------------
# topk-train's exit statuses, as a console script
# ---------------------------------------------------------------------------

_TOY_GIN = toy.train_gin("NAN_AT_STEP = None\ntoy.ToyModel.nan_at_step = %NAN_AT_STEP",
                         learning_rate="@train.rsqrt_schedule()", log_period="1", checkpoint_period="2")


def _train_command():
  exe = shutil.which("topk-train", path=os.path.dirname(sys.executable))
  assert exe, "topk-train is not installed next to this Python (pip install -e .)"
  return exe


def _env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")


def _errors(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


# One subprocess imports what topk-train imports (TensorFlow's ~10 s among them), once, then forks a process per
# run: each child calls topk-train's console-script entry point (read from the installed package's metadata) as
# the generated script does, ``sys.exit(main())``, with its own stdout and stderr, and the parent reads its exit
# status with waitpid. Nothing has run JAX or TensorFlow when it forks (imports only), so the children are clean.
# The drivers below share this prelude: the imports, and start / finish.
_FORK_PRELUDE = textwrap.dedent(r"""
    import importlib.metadata, json, os, re, signal, sys, tempfile, time, traceback
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "topk-train"]
    main = entry.load()
    import toy  # noqa: F401  the gin file's model and dataset
    from topk_transformers import checkpoints, gin_utils, train  # noqa: F401  imported here, run in the children

    def start(argv):
      sys.stdout.flush(); sys.stderr.flush()
      out_r, out_w = os.pipe()
      err = tempfile.TemporaryFile()
      pid = os.fork()
      if pid == 0:  # the child: the console script
        os.close(out_r)
        os.dup2(out_w, 1); os.dup2(err.fileno(), 2)
        sys.argv = list(argv)
        try:
          code = main()
        except SystemExit as e:
          code = e.code
        except BaseException:  # as the interpreter would: a traceback, status 1
          traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))
      os.close(out_w)
      return pid, os.fdopen(out_r), err

    def finish(pid, out, err, stdout=""):
      stdout += out.read()
      _, status = os.waitpid(pid, 0)
      err.seek(0)
      return dict(returncode=os.waitstatus_to_exitcode(status), stdout=stdout, stderr=err.read().decode())

    def signal_past_step_1(argv, signum):
      # Starts argv, sends signum once a progress line past step 1 is out ("step N/... | loss ..."), finishes.
      pid, out, err = start(argv)
      seen, deadline = "", time.time() + 300
      for line in out:
        seen += line
        if line.startswith("step ") and not line.startswith("step 1/") or time.time() > deadline:
          break
      os.kill(pid, signum)
      return finish(pid, out, err, seen)
""")

_EXIT_STATUS_DRIVER = _FORK_PRELUDE + textwrap.dedent(r"""
    gin_file, run_dir, fresh = sys.argv[1:4]
    base = ["topk-train", f"--gin_file={gin_file}"]


    def run(*extra):
      return finish(*start(base + [f"--gin.MODEL_DIR='{run_dir}'", *extra]))

    results = {}
    results["config"] = run("--gin.TRAIN_STEPS=4", "--gin.train.train.no_such_setting=1")
    results["nan"] = run("--gin.TRAIN_STEPS=10", "--gin.NAN_AT_STEP=5")
    # The newest checkpoint (step 4) made unreadable: every file cut in half.
    for root, _, names in os.walk(os.path.join(run_dir, "checkpoints", "4")):
      for name in names:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(os.path.getsize(os.path.join(root, name)) // 2)
    results["unreadable"] = run("--gin.TRAIN_STEPS=10")
    # SIGTERM once a progress line past step 1 is out ("step N/100000 | loss ...").
    results["sigterm"] = signal_past_step_1(base + [f"--gin.MODEL_DIR='{fresh}'", "--gin.TRAIN_STEPS=100000",
                                                    "--gin.train.train.checkpoint_period=100000"], signal.SIGTERM)
    print("RESULT " + json.dumps(results))
""")


def _run_driver(tmp_path, driver, *dirs):
  """Runs a driver script over the toy gin file and the run directories ``dirs``; its ``RESULT`` dict."""
  _train_command()  # the console script is installed
  gin_file = tmp_path / "toy.gin"
  gin_file.write_text(_TOY_GIN)
  proc = subprocess.run([sys.executable, "-c", driver, str(gin_file), *map(str, dirs)],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_train_command_exit_statuses_in_a_subprocess(tmp_path):
  run_dir, fresh = tmp_path / "run", tmp_path / "fresh"
  r = _run_driver(tmp_path, _EXIT_STATUS_DRIVER, run_dir, fresh)

  # A configuration mistake: 2, one line, no traceback.
  assert r["config"]["returncode"] == 2, r["config"]["stderr"][-2000:]
  assert len(_errors(r["config"]["stderr"])) == 1 and "Traceback" not in r["config"]["stderr"]

  # A NaN loss at step 5: 1, naming the step and the last good checkpoint.
  assert r["nan"]["returncode"] == 1, r["nan"]["stderr"][-2000:]
  (line,) = _errors(r["nan"]["stderr"])
  assert "at step 5" in line and "last good checkpoint is step 4" in line, line

  # An unreadable newest checkpoint: 1, naming it; nothing is deleted.
  assert r["unreadable"]["returncode"] == 1, r["unreadable"]["stderr"][-2000:]
  (line,) = _errors(r["unreadable"]["stderr"])
  assert "4" in line and "Traceback" not in r["unreadable"]["stderr"], line
  assert (run_dir / "checkpoints" / "4").exists()

  # SIGTERM: the checkpoint is written, then 143.
  assert r["sigterm"]["returncode"] == 143, r["sigterm"]["stderr"][-2000:]
  steps = [int(n) for n in os.listdir(fresh / "checkpoints") if n.isdigit()]
  assert steps and max(steps) >= 2, steps


# ---------------------------------------------------------------------------
# Ctrl-C: like SIGTERM, a checkpoint at the next step, then 130; the same command resumes
# ---------------------------------------------------------------------------

_SIGINT_DRIVER = _FORK_PRELUDE + textwrap.dedent(r"""
    gin_file, run_dir = sys.argv[1:3]
    base = ["topk-train", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{run_dir}'",
            "--gin.train.train.checkpoint_period=100000"]


    results = {}
    # Ctrl-C (SIGINT) once a progress line past step 1 is out ("step N/100000 | loss ...").
    results["sigint"] = signal_past_step_1(base + ["--gin.TRAIN_STEPS=100000"], signal.SIGINT)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    results["steps"] = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []
    stopped = re.search(r"stopped by SIGINT at step (\d+)", results["sigint"]["stderr"])
    if stopped:  # the same command, two steps further
      results["resume"] = finish(*start(base + [f"--gin.TRAIN_STEPS={int(stopped.group(1)) + 2}"]))
    print("RESULT " + json.dumps(results))
""")


@pytest.mark.slow
def test_train_command_ctrl_c_writes_a_checkpoint_exits_130_and_resumes(tmp_path):
  run_dir = tmp_path / "run"
  r = _run_driver(tmp_path, _SIGINT_DRIVER, run_dir)

  sigint = r["sigint"]
  assert sigint["returncode"] == 130, sigint["stderr"][-2000:]
  assert "Traceback" not in sigint["stderr"] and "KeyboardInterrupt" not in sigint["stderr"]
  (line,) = [line for line in sigint["stderr"].splitlines() if line.startswith("stopped by SIGINT")]
  step = int(line.split("at step ")[1].split(",")[0])
  assert line == f"stopped by SIGINT at step {step}, checkpoint written; run the same command again to resume"
  # The checkpoint is the step it stopped at (no periodic checkpoint was due), past the progress line seen.
  assert r["steps"] == [step] and step >= 2, r["steps"]

  resume = r["resume"]
  assert resume["returncode"] == 0, resume["stderr"][-2000:]
  progress = [line for line in resume["stdout"].splitlines() if line.startswith("step ")]
  assert progress and progress[0].startswith(f"step {step + 1}/{step + 2}"), progress
  assert max(int(n) for n in os.listdir(run_dir / "checkpoints") if n.isdigit()) == step + 2
