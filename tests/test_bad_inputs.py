"""Bad inputs get one clear line and lose nothing: text files, a NaN before any checkpoint, unreadable checkpoints."""

import hashlib
import logging
import os
import shutil

import gin
import jax
import numpy as np
import optax
import pytest

from topk_transformers import checkpoints, train
from topk_transformers.data import tasks, vocab
from topk_transformers.gin_utils import ConfigError
from toy import ToyDataset, ToyModel, ToyNet

LENGTHS = {"inputs": 32, "targets": 8}
GOOD_TEXT = "".join(f"The river city number {i} was on the island. It had a king and a church.\n" for i in range(50))


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(tmp_path / "cache"))
  yield tmp_path / "cache"
  gin.clear_config()
  tasks.register_local_text_task()  # the built-in Task as other test files expect it


def _one_line_config_error(call, match):
  with pytest.raises(ConfigError, match=match) as err:
    call()
  assert "\n" not in str(err.value)
  return err.value


def _get_train_dataset(task):
  return task.get_dataset(LENGTHS, split="train", shuffle=False)


# ----------------------------------------------------------------------------- text files


@pytest.mark.parametrize("content, problem", [(b"", "is empty"), (b"\n   \n\t\n", "has no text, only blank lines")])
def test_empty_train_file_is_a_config_error_before_the_vocabulary_is_trained(tmp_path, tmp_cache, content, problem):
  path = tmp_path / "train.txt"
  path.write_bytes(content)
  task = tasks.register_local_text_task(name="test_empty", train_files=str(path), vocab_size=100)
  for call in (lambda: _get_train_dataset(task), lambda: tasks.check_task_data(task)):
    _one_line_config_error(call, rf"^train file {path} {problem}: it needs one document per line$")
  assert not (tmp_cache / "spm").exists(), "nothing is trained or written"


def test_non_utf8_file_names_the_file_and_the_first_bad_byte(tmp_path, tmp_cache):
  path = tmp_path / "latin1.txt"
  path.write_bytes(GOOD_TEXT.encode() + "un café noir\nl'été\n".encode("latin-1"))
  offset = len(GOOD_TEXT.encode()) + len(b"un caf")
  task = tasks.register_local_text_task(name="test_latin1", train_files=str(path), vocab_size=100)
  _one_line_config_error(lambda: _get_train_dataset(task),
                         rf"^train file {path} is not UTF-8: byte 0xe9 at byte offset {offset} \(line 51\); "
                         r"convert it to UTF-8")
  assert not (tmp_cache / "spm").exists()


def test_utf8_check_across_read_blocks(tmp_path):
  """A character cut by a 1 MiB read block is fine; a bad byte after the cut gets its true offset."""
  head = b"a" * ((1 << 20) - 1) + "é".encode()  # the two bytes of é straddle the first block boundary
  good = tmp_path / "good.txt"
  good.write_bytes(head + b" fine\n")
  vocab.check_text_file(str(good))
  bad = tmp_path / "bad.txt"
  bad.write_bytes(head + b"\nok\n\xff\n")
  _one_line_config_error(lambda: vocab.check_text_file(str(bad)),
                         rf"byte 0xff at byte offset {len(head) + 4} \(line 3\)")
  cut = tmp_path / "cut.txt"
  cut.write_bytes(b"text " + "é".encode()[:1])
  _one_line_config_error(lambda: vocab.check_text_file(str(cut)), r"ends inside a character, at byte offset 5$")


def test_missing_file_among_the_train_files_is_named(tmp_path):
  (tmp_path / "a.txt").write_text(GOOD_TEXT, encoding="utf-8")
  missing = tmp_path / "typo.txt"
  task = tasks.register_local_text_task(name="test_missing", train_files=[str(tmp_path / "a.txt"), str(missing)],
                                        vocab_size=100)
  err = _one_line_config_error(lambda: _get_train_dataset(task), rf"train file {missing} does not exist; bind "
                               r"tasks.register_local_text_task.train_files")
  assert isinstance(err, tasks.MissingDataError)  # what check_task_data promises for missing data


def test_train_sentencepiece_checks_its_files_before_writing(tmp_path):
  empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
  empty.write_bytes(b"")
  latin1.write_bytes("\xe9t\xe9\n".encode("latin-1"))
  prefix = str(tmp_path / "out" / "m")
  _one_line_config_error(lambda: vocab.train_sentencepiece([str(empty)], prefix, vocab_size=100),
                         rf"^SentencePiece training file {empty} is empty")
  _one_line_config_error(lambda: vocab.train_sentencepiece([str(latin1)], prefix, vocab_size=100),
                         r"byte 0xe9 at byte offset 0 \(line 1\)")
  with pytest.raises(FileNotFoundError, match=r"does not exist") as err:
    vocab.train_sentencepiece([str(tmp_path / "nope.txt")], prefix, vocab_size=100)
  assert isinstance(err.value, ConfigError)
  assert not (tmp_path / "out").exists()


def test_too_little_text_for_the_vocabulary_size_is_a_config_error(tmp_path):
  path = tmp_path / "tiny.txt"
  path.write_text("One short line.\n", encoding="utf-8")
  _one_line_config_error(lambda: vocab.train_sentencepiece([str(path)], str(tmp_path / "m"), vocab_size=3996),
                         r"too little for a vocabulary of 3996 pieces \(SentencePiece can give at most \d+\)")
  assert not os.path.exists(tmp_path / "m.model")


def test_train_command_prints_one_error_line_and_exits_2_for_an_empty_file(tmp_path, capsys):
  from topk_transformers.commands import train as train_command

  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  status = train_command.main(["--gin_file=t5/runs/cpu_smoke.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                               f"--gin.tasks.register_local_text_task.train_files=['{empty}']"])
  assert status == 2
  err = capsys.readouterr().err
  assert [line for line in err.splitlines() if line.strip()][-1:] == [
      f"error: train file {empty} is empty: it needs one document per line"]
  assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- trainer


def _run(model_dir, steps, model=None, **kw):
  return train.train(model=model or ToyModel(), dataset=ToyDataset(), model_dir=str(model_dir), train_steps=steps,
                     batch_size=32, optimizer=optax.adam, learning_rate=lambda s: 1e-2, eval_period=0,
                     log_period=5, checkpoint_period=5, **kw)


def _params(result):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(result.state.params))


def _files(directory):
  """{relative path: sha256} of every file under ``directory``."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """A 16-step run: checkpoints 10, 15, 16 (three kept)."""
  model_dir = tmp_path_factory.mktemp("straight")
  return model_dir, _run(model_dir, 16)


def _copy_of(straight, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(straight[0], run)
  return run


def _truncate(step_dir):
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _delete_files(step_dir):
  for root, _, names in os.walk(step_dir):
    for name in names:
      os.remove(os.path.join(root, name))


def _break(run, step, how):
  if how == "truncated":
    _truncate(run / "checkpoints" / str(step))
  elif how == "files deleted":
    _delete_files(run / "checkpoints" / str(step))
  else:  # the data position
    _truncate(run / "checkpoints_data" / str(step))


def test_nan_at_the_first_step_says_no_checkpoint_was_written_yet(tmp_path):
  with pytest.raises(train.NonFiniteLossError) as err:
    _run(tmp_path / "run", 20, model=ToyModel(nan_at_step=0))
  message = str(err.value)
  assert message == ("loss or gradients became NaN/inf at step 0; training stopped and no checkpoint was written "
                     "yet, so there is none to resume from")
  assert checkpoints.CheckpointManager(str(tmp_path / "run")).latest_step() is None


@pytest.mark.parametrize("how", ["truncated", "files deleted", "data position"])
def test_unreadable_newest_checkpoint_names_it_and_the_resume_option(tmp_path, straight, how):
  run = _copy_of(straight, tmp_path)
  _break(run, 16, how)
  before = _files(run)
  with pytest.raises(checkpoints.UnreadableCheckpointError) as err:
    _run(run, 20)
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(f"checkpoint step 16 at {run}/checkpoints/16 cannot be read (")
  assert "different model" not in message
  assert message.endswith("; to resume from the newest readable checkpoint instead, run again with "
                          f"--gin.train.train.resume_from_readable=True (it moves unreadable ones to "
                          f"{run}/checkpoints_unreadable)")
  assert (err.value.step, err.value.path) == (16, f"{run}/checkpoints/16")
  after = _files(run)
  assert {k: v for k, v in after.items() if k in before} == before, "nothing deleted or changed"


def test_resume_from_readable_restores_the_newest_readable_step_and_deletes_nothing(tmp_path, straight, caplog):
  run = _copy_of(straight, tmp_path)
  _truncate(run / "checkpoints" / "16")
  unreadable = _files(run / "checkpoints" / "16")
  data_16 = _files(run / "checkpoints_data" / "16")
  with caplog.at_level(logging.WARNING):
    resumed = _run(run, 16, resume_from_readable=True)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  skipped = f"skipping unreadable checkpoint: checkpoint step 16 at {run}/checkpoints/16 cannot be read ("
  assert any(m.startswith(skipped) for m in warnings), warnings
  assert any(m.startswith("moved unreadable checkpoint step 16 to ") for m in warnings), warnings
  # Params, optimizer state and data position of step 15: one more step gives the straight run's step 16 exactly.
  assert int(resumed.state.step) == 16
  for a, b in zip(jax.tree_util.tree_leaves(_params(straight[1])), jax.tree_util.tree_leaves(_params(resumed))):
    np.testing.assert_array_equal(a, b)
  # The unreadable step is set aside whole, state and data position; step 16 is written anew.
  assert _files(run / "checkpoints_unreadable" / "16") == unreadable
  assert _files(run / "checkpoints_unreadable" / "data" / "16") == data_16
  assert checkpoints.CheckpointManager(str(run)).all_steps() == [10, 15, 16]
  assert _run(run, 17).state.step == 17, "the new step 16 restores without the option"


def test_resume_from_readable_with_no_readable_checkpoint_stops_and_moves_nothing(tmp_path, straight):
  run = _copy_of(straight, tmp_path)
  for step in (10, 15, 16):
    _truncate(run / "checkpoints" / str(step))
  before = _files(run)
  with pytest.raises(checkpoints.UnreadableCheckpointError,
                     match=rf"^no checkpoint in {run}/checkpoints can be read \(steps 16, 15, 10\)"):
    _run(run, 20, resume_from_readable=True)
  assert _files(run) == before
  assert not (run / "checkpoints_unreadable").exists()


def test_resume_from_readable_does_not_skip_a_checkpoint_of_another_model(tmp_path, straight):
  run = _copy_of(straight, tmp_path)
  with pytest.raises(checkpoints.CheckpointError, match=r"step 16 .* is of a different model"):
    _run(run, 20, model=ToyModel(ToyNet(hidden=32)), resume_from_readable=True)
  assert not (run / "checkpoints_unreadable").exists()


def test_resume_option_is_a_gin_binding_of_train():
  gin.parse_config(["from __gin__ import dynamic_registration",
                    "from topk_transformers import train",
                    "train.train.resume_from_readable = True"])
  assert "resume_from_readable = True" in gin.config_str()


def test_restore_params_takes_a_relative_checkpoint_path(tmp_path, monkeypatch):
  """``--checkpoint=runs/x`` as a user types it: orbax itself accepts absolute paths only."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  mngr = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"), item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  mngr.save(7, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"params": params, "step": 7})))
  mngr.wait_until_finished()
  mngr.close()
  monkeypatch.chdir(tmp_path)
  abstract = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
  restored, step = checkpoints.restore_params("run", abstract, {"w": None})
  assert step == 7
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(params["w"]))


# ----------------------------------------------------------------------------- topk-decode's inputs

DECODE_INPUT_LENGTH = 16


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
  """``(gin flags, run dir, params)``: a tiny T5 with a byte vocabulary, inputs length 16, random params at step 3."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from topk_transformers import gin_utils  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("byte_run")
  gin_file = root / "bytes.gin"
  gin_file.write_text("from __gin__ import dynamic_registration\nimport seqio\ninclude 't5/t5_1_0/tiny.gin'\n"
                      "VOCABULARY = @seqio.ByteVocabulary()\n"
                      f"TASK_FEATURE_LENGTHS = {{'inputs': {DECODE_INPUT_LENGTH}, 'targets': 8}}\n")
  flags = [f"--gin_file={gin_file}", "--gin.NUM_EMBEDDINGS=384", "--gin.TOP_K=32",
           "--gin.network.T5Config.num_encoder_layers=1", "--gin.network.T5Config.num_decoder_layers=1"]
  gin_utils.configure(*gin_utils.parse_gin_flags(flags)[:2])
  module = gin_utils.get_macro("MODEL").module
  ones = jnp.ones((1, 4), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ones, ones, ones,
                                                            enable_dropout=False)))["params"]
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.randn(*s.shape) / np.sqrt(s.shape[0]), jnp.float32),
                                  shapes)
  manager = checkpoints.CheckpointManager(str(root / "run"), async_save=False)
  manager.save(3, {"params": params, "step": 0})
  manager.close()
  gin.clear_config()
  return flags, root / "run", params


def _decode(byte_run, *args):
  from topk_transformers.commands import decode as decode_command  # pylint: disable=g-import-not-at-top

  flags, run, _ = byte_run
  return decode_command.main([*flags, f"--checkpoint={run}", "--max_decode_length=4", *args])


def _error_lines(err):
  return [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line]


def test_decode_cuts_a_long_input_to_the_models_input_length_with_one_line(byte_run, tmp_path, capsys, monkeypatch):
  """A 100 KB input grew the encoder, and memory, to 22 GB: it is cut to TASK_FEATURE_LENGTHS['inputs']."""
  import resource  # pylint: disable=g-import-not-at-top
  from topk_transformers.t5 import decoding as t5_decoding  # pylint: disable=g-import-not-at-top

  seen = []
  predict = t5_decoding.predict_batch
  monkeypatch.setattr(t5_decoding, "predict_batch",
                      lambda module, params, batch, **kw: (seen.append(batch["encoder_input_tokens"].shape),
                                                           predict(module, params, batch, **kw))[1])
  long = "word " * 20_000  # 100 KB: 100,000 byte tokens
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  out = tmp_path / "out.json"
  # The decode runs under a data limit 2 GiB above what this process maps now: an encoder that followed the input
  # (100,000 tokens, attention logits of 10^10 entries per head) fails to allocate instead of taking the machine.
  data_now = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData:")][0]
  soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
  resource.setrlimit(resource.RLIMIT_DATA, (data_now + (2 << 30), hard))
  try:
    assert _decode(byte_run, "--input", long, "--input", "short", f"--json={out}") == 0
  finally:
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 2 << 20  # KiB: under 2 GiB more
  assert seen == [(2, DECODE_INPUT_LENGTH)]  # the long input's 15 tokens and EOS; the short one padded to it
  err = capsys.readouterr().err
  notices = [line for line in err.splitlines() if "input length" in line]
  assert len(notices) == 1 and notices[0].endswith(
      f"input 1 is longer than the model's input length of {DECODE_INPUT_LENGTH} tokens: truncated to it, its last "
      f"{100_000 - (DECODE_INPUT_LENGTH - 1):,} tokens dropped"), notices
  assert not _error_lines(err)
  import json  # pylint: disable=g-import-not-at-top
  assert len(json.loads(out.read_text())["results"]) == 2
  # --input_length sets it on the command line; an input that fits is not padded to it.
  seen.clear()
  assert _decode(byte_run, "--input", "hello", "--input_length=8") == 0
  assert _decode(byte_run, "--input", long, "--input_length=8") == 0
  assert seen == [(1, 6), (1, 8)]
  assert f"its last {100_000 - 7:,} tokens dropped" in capsys.readouterr().err


def test_input_is_tokenised_in_pieces_with_the_same_ids():
  """The pieces that bound a long input's token ids give the ids of the whole, cut to the length."""
  import seqio  # pylint: disable=g-import-not-at-top
  from topk_transformers.t5 import text  # pylint: disable=g-import-not-at-top

  vocabulary = seqio.ByteVocabulary()
  long = "".join(f"piece {i} of a long input, " for i in range(10_000))
  assert len(long) > 3 * text.PIECE_CHARS
  whole = list(vocabulary.encode(long))
  assert text.encode_text(long, vocabulary, len(whole) + 1) == (whole + [text.EOS_ID], 0)
  assert text.encode_text(long, vocabulary, 100) == (whole[:99] + [text.EOS_ID], len(whole) - 99)
  assert text.encode_text("hi", vocabulary, 100) == (list(vocabulary.encode("hi")) + [text.EOS_ID], 0)
  assert text.encode_texts(["hi", long], vocabulary, 10).shape == (2, 10)


def test_decode_non_utf8_input_is_one_line_and_exit_2(byte_run, tmp_path, capsys):
  latin1 = "caf\xe9 noir".encode("latin-1").decode("utf-8", "surrogateescape")  # as Python hands over argv bytes
  assert _decode(byte_run, "--input", "fine", "--input", latin1) == 2
  err = capsys.readouterr().err
  assert _error_lines(err) == ["error: --input number 2 is not UTF-8 text: byte 0xe9 at byte offset 3; "
                               "convert it to UTF-8"], err
  path = tmp_path / "inputs.txt"
  path.write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
  assert _decode(byte_run, f"--input_file={path}") == 2
  err = capsys.readouterr().err
  assert _error_lines(err) == [f"error: {path} is not UTF-8 text (byte 8: b'\\xe9')"], err


@pytest.mark.parametrize("flag, message", [
    ("--num_decodes=0", "--num_decodes=0: it must be at least 1"),
    ("--temperature=-0.5", "--temperature=-0.5: it must be >= 0 (0 is greedy)"),
    ("--temperature=nan", "--temperature=nan: it must be >= 0 (0 is greedy)"),
    ("--max_decode_length=0", "--max_decode_length=0: it must be at least 1"),
    ("--input_length=0", "--input_length=0: it must be at least 1"),
    ("--topp=1.5", "--topp=1.5: it must lie in [0, 1] (0: off)"),
])
def test_decode_settings_are_one_line_and_exit_2_before_any_model_is_built(byte_run, capsys, monkeypatch, flag,
                                                                            message):
  from topk_transformers import gin_utils, runs  # pylint: disable=g-import-not-at-top

  def built(*args, **kwargs):
    raise AssertionError("the settings are checked before gin is read or a model is built")

  monkeypatch.setattr(gin_utils, "configure", built)
  monkeypatch.setattr(runs, "load_run", built)
  # The later flag wins, so --max_decode_length=0 overrides _decode's 4.
  assert _decode(byte_run, "--input", "hello", flag) == 2
  err = capsys.readouterr().err
  assert _error_lines(err) == [f"error: {message}"], err


def test_decode_truncated_predictors_file_is_one_line_naming_it(byte_run, tmp_path, capsys):
  from topk_transformers import predictors  # pylint: disable=g-import-not-at-top

  path = str(tmp_path / "r8.npz")
  predictors.save(path, predictors.perfect_predictors(byte_run[2]))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  assert _decode(byte_run, "--input", "hello", f"--predictors={path}") == 2
  err = capsys.readouterr().err
  assert _error_lines(err) == [f"error: cannot read predictors file {path}: not a predictors file, or truncated or "
                               "corrupt (BadZipFile: File is not a zip file)"], err
