"""seqio Tasks (C4 through tfds mock data, local text), the cached SentencePiece vocabulary, the corpus."""

import json
import os
import re
import subprocess
import sys
import textwrap

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from topk_transformers.data import corpus
from topk_transformers.data import span_corruption as sc
from topk_transformers.data import tasks
from topk_transformers.data import vocab
from topk_transformers.gin_utils import ConfigError
from test_vocab import MEMORY_PROBE, write_one_line

WORDS = ("the of and to in is was for on that with as by at from his her it an are were which this be or "
         "river city king war music church school island language science water light green house").split()


def write_docs(path, num_docs, seed, empty_every=0):
  """One document per line, made of random words; every ``empty_every``-th line is empty."""
  rng = np.random.default_rng(seed)
  lines = []
  for i in range(num_docs):
    if empty_every and i % empty_every == 0:
      lines.append("")
      continue
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))).capitalize() + "."
                 for _ in range(rng.integers(1, 6))]
    lines.append(" ".join(sentences))
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return lines


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(tmp_path / "cache"))
  yield tmp_path / "cache"
  # Leave the registry and gin as other test files expect them.
  gin.clear_config()
  tasks.register_c4_span_corruption()
  tasks.register_local_text_task()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  d = tmp_path_factory.mktemp("spm")
  write_docs(d / "corpus.txt", 300, seed=0)
  return vocab.train_sentencepiece([str(d / "corpus.txt")], str(d / "tiny"), vocab_size=100)


def reconstruct(inputs, targets, vocabulary):
  """The raw token stream behind span-corrupted ``inputs``/``targets`` (EOS stripped)."""
  first_sentinel = vocabulary.vocab_size - vocabulary.extra_ids
  inputs, targets = list(inputs[:-1]), list(targets[:-1])
  spans, current = {}, None
  for t in targets:
    if t >= first_sentinel:
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  out = []
  for t in inputs:
    out.extend(spans.pop(t) if t >= first_sentinel else [t])
  assert not spans, "every target span has its sentinel in the inputs"
  return out


def stream_of(examples, vocabulary):
  return [t for e in examples for t in reconstruct(e["inputs"], e["targets"], vocabulary)]


# ----------------------------------------------------------------------------- vocabulary


def test_trained_vocab_is_t5_like(tiny_model):
  v = vocab.get_vocabulary(tiny_model, extra_ids=100)
  tok = v.tokenizer
  assert (tok.pad_id(), tok.eos_id(), tok.unk_id(), tok.bos_id()) == (0, 1, 2, -1)
  assert tok.get_piece_size() == 100 + 100 and v.vocab_size == 200
  # The span-corruption sentinels are seqio's extra ids: <extra_id_i> = vocab_size - 1 - i.
  assert tok.id_to_piece(sc.sentinel_id(v, 0)) == "▁<extra_id_0>"
  assert tok.id_to_piece(sc.sentinel_id(v, 7)) == "▁<extra_id_7>"
  ids = v.encode("The river city.")
  assert ids and max(ids) < 100 and 2 not in ids and v.decode(ids) == "The river city."


def test_vocab_cache_reused_and_invalidated(tmp_path):
  text = tmp_path / "a.txt"
  write_docs(text, 200, seed=1)
  prefix = str(tmp_path / "m")
  path = vocab.train_sentencepiece([str(text)], prefix, vocab_size=100)
  stamp = lambda: (os.stat(path).st_ino, os.stat(path).st_mtime_ns)
  first = stamp()
  assert vocab.train_sentencepiece([str(text)], prefix, vocab_size=100) == path
  assert stamp() == first, "same corpus and settings: the cached model is reused"
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f], "no temporary files left"

  vocab.train_sentencepiece([str(text)], prefix, vocab_size=90)
  assert stamp() != first, "other settings retrain"
  second = stamp()
  write_docs(text, 200, seed=2)
  vocab.train_sentencepiece([str(text)], prefix, vocab_size=90)
  assert stamp() != second, "another corpus retrains"
  third = stamp()
  os.remove(prefix + ".json")  # as if killed between writing the model and its fingerprint
  vocab.train_sentencepiece([str(text)], prefix, vocab_size=90)
  assert stamp() != third and os.path.exists(prefix + ".json")


def test_training_is_deterministic(tmp_path):
  text = tmp_path / "a.txt"
  write_docs(text, 200, seed=3)
  a = vocab.train_sentencepiece([str(text)], str(tmp_path / "a"), vocab_size=100)
  b = vocab.train_sentencepiece([str(text)], str(tmp_path / "b"), vocab_size=100)
  assert open(a, "rb").read() == open(b, "rb").read()


def test_lazy_vocab_trains_at_first_use(tmp_path, tmp_cache):
  text = tmp_path / "a.txt"
  write_docs(text, 200, seed=4)
  v = vocab.TrainedSentencePieceVocabulary([str(text)], vocab_size=100, name="lazy", extra_ids=10)
  assert not os.path.exists(tmp_cache / "spm")
  assert v.vocab_size == 110
  (model,) = [f for f in os.listdir(tmp_cache / "spm") if f.endswith(".model")]
  assert model.startswith("lazy-100-") and v.sentencepiece_model_file.endswith(model)


def test_cache_dir_env_and_gin(tmp_cache):
  assert vocab.cache_dir() == str(tmp_cache)
  gin.parse_config("vocab.cache_dir.path = '/somewhere/else'")
  assert vocab.cache_dir() == "/somewhere/else"


# ----------------------------------------------------------------------------- C4 Task


def test_c4_task_on_mock_tfds(tiny_model, tmp_path):
  v = vocab.get_vocabulary(tiny_model)
  task = tasks.register_c4_span_corruption(name="test_c4", vocabulary=v, tfds_data_dir=str(tmp_path))
  lengths = {"inputs": 64, "targets": sc.random_spans_helper(64)[1]}
  with tfds.testing.mock_data(num_examples=120, policy=tfds.testing.MockPolicy.USE_CODE):
    tasks.check_task_data(task, ("train", "validation"))
    texts = [x["text"].decode() for x in tfds.load(tasks.DEFAULT_C4_TFDS_NAME, split="train",
                                                   data_dir=str(tmp_path)).as_numpy_iterator()]
    ds = task.get_dataset(lengths, split="train", shuffle=False, seed=0)
    examples = list(ds.as_numpy_iterator())
  assert len(examples) >= 10
  for e in examples:
    assert 0 < len(e["inputs"]) <= 64 and 0 < len(e["targets"]) <= lengths["targets"]
    assert e["inputs"][-1] == e["targets"][-1] == 1
  assert len(examples[0]["inputs"]) == 64 and len(examples[0]["targets"]) == lengths["targets"]
  # The corrupted examples hold exactly the tokens of the mock C4 texts, in order.
  tokens = [t for text in texts for t in v.encode(text)]
  assert stream_of(examples, v) == tokens


def test_missing_c4_is_a_one_line_error(tiny_model, tmp_path):
  task = tasks.register_c4_span_corruption(name="test_c4_missing", vocabulary=vocab.get_vocabulary(tiny_model),
                                           tfds_data_dir=str(tmp_path / "empty"))
  for call in (lambda: tasks.check_task_data(task),
               lambda: task.get_dataset({"inputs": 64, "targets": 14}, split="train"),
               lambda: task.get_dataset({"inputs": 64, "targets": 14}, split="train",
                                        shard_info=seqio.ShardInfo(index=0, num_shards=1))):
    with pytest.raises(tasks.MissingDataError) as err:
      call()
    message = str(err.value)
    assert "\n" not in message and "c4/en" in message and "tfds build" in message and "tfds_data_dir" in message


# ----------------------------------------------------------------------------- local text Task


def test_local_text_task(tmp_path, tmp_cache):
  train = write_docs(tmp_path / "train.txt", 150, seed=5, empty_every=7)
  valid = write_docs(tmp_path / "valid.txt", 30, seed=6)
  gin.parse_config([f"tasks.register_local_text_task.train_files = ['{tmp_path}/train.txt']",
                    f"tasks.register_local_text_task.validation_files = '{tmp_path}/valid.txt'",
                    "tasks.register_local_text_task.vocab_size = 100"])
  task = tasks.get_task(tasks.LOCAL_TEXT_TASK)
  assert seqio.get_mixture_or_task(tasks.LOCAL_TEXT_TASK) is task
  assert not os.path.exists(tmp_cache / "spm"), "the vocabulary is trained at first use, not at registration"
  tasks.check_task_data(task, ("train", "validation"))
  v = task.output_features["targets"].vocabulary
  assert task.output_features["inputs"].vocabulary is v and v.vocab_size == 200
  lengths = {"inputs": 32, "targets": sc.random_spans_helper(32)[1]}
  for split, lines in (("train", train), ("validation", valid)):
    examples = list(task.get_dataset(lengths, split=split, shuffle=False, seed=1).as_numpy_iterator())
    assert all(len(e["inputs"]) <= 32 and len(e["targets"]) <= lengths["targets"] for e in examples)
    assert stream_of(examples, v) == [t for line in lines for t in v.encode(line)]
  assert any(f.endswith(".model") for f in os.listdir(tmp_cache / "spm"))


def test_local_task_iterator_is_checkpointable(tmp_path, tiny_model):
  """The trainer saves the data position with the model: a restored iterator continues where it was."""
  write_docs(tmp_path / "train.txt", 200, seed=7)
  task = tasks.register_local_text_task(name="test_ckpt", train_files=str(tmp_path / "train.txt"),
                                        vocabulary_path=tiny_model)
  ds = task.get_dataset({"inputs": 32, "targets": 8}, split="train", shuffle=True, seed=3, num_epochs=None)
  it = iter(ds)
  for _ in range(3):
    next(it)
  ckpt = tf.train.Checkpoint(iterator=it)
  path = ckpt.write(str(tmp_path / "ckpt" / "data"))
  after = [next(it)["inputs"].numpy() for _ in range(4)]
  ckpt.read(path).assert_consumed()
  again = [next(it)["inputs"].numpy() for _ in range(4)]
  assert all(np.array_equal(a, b) for a, b in zip(after, again))


def test_reregistering_replaces(tmp_path, tiny_model):
  write_docs(tmp_path / "a.txt", 20, seed=8)
  first = tasks.register_local_text_task(name="test_twice", train_files=str(tmp_path / "a.txt"),
                                         vocabulary_path=tiny_model)
  second = tasks.register_local_text_task(name="test_twice", train_files=str(tmp_path / "a.txt"),
                                          vocabulary_path=tiny_model, noise_density=0.3)
  assert first is not second and tasks.get_task("test_twice") is second


def test_missing_local_files_are_one_line_errors(tmp_path, tiny_model):
  task = tasks.register_local_text_task(name="test_nofile", train_files=str(tmp_path / "nope.txt"),
                                        vocabulary_path=tiny_model)
  with pytest.raises(tasks.MissingDataError, match=r"no text file for split 'train'.*nope\.txt.*train_files"):
    tasks.check_task_data(task)
  write_docs(tmp_path / "a.txt", 5, seed=9)
  task = tasks.register_local_text_task(name="test_novocab", train_files=str(tmp_path / "a.txt"),
                                        vocabulary_path=str(tmp_path / "no.model"))
  with pytest.raises(tasks.MissingDataError, match=r"SentencePiece model .*no\.model.* not found"):
    tasks.check_task_data(task)


# ----------------------------------------------------------------------------- long lines


def test_cut_long_lines_copies_only_files_that_need_it(tmp_path, tmp_cache):
  short = tmp_path / "short.txt"
  lines = write_docs(short, 20, seed=10)
  assert corpus.cut_long_lines(str(short), max(map(len, lines))) == str(short), "no line too long: read in place"
  long_line = " ".join(f"word{i}" for i in range(3000))  # 26 k characters
  path = tmp_path / "long.txt"
  path.write_text(f"{lines[0]}\n\n{long_line}\n{lines[1]}", encoding="utf-8")
  copy = corpus.cut_long_lines(str(path), 1000)
  assert copy != str(path) and copy.startswith(str(tmp_cache / "text"))
  out = open(copy, encoding="utf-8").read().split("\n")
  pieces = out[2:-2]
  assert out[:2] == [lines[0], ""] and out[-2:] == [lines[1], ""], "shorter lines are copied unchanged"
  assert all(990 <= len(p) <= 1000 for p in pieces[:-1]) and 0 < len(pieces[-1]) <= 1000, "cut at the last space"
  assert " ".join(pieces) == long_line, "cut at spaces: no word is split"
  stamp = os.stat(copy).st_mtime_ns
  assert corpus.cut_long_lines(str(path), 1000) == copy and os.stat(copy).st_mtime_ns == stamp, "the copy is reused"
  path.write_text(long_line, encoding="utf-8")
  assert corpus.cut_long_lines(str(path), 1000) != copy, "a changed file gets a new copy"
  assert not [f for f in os.listdir(tmp_cache / "text") if ".tmp-" in f]


def test_a_long_line_is_read_as_documents_of_bounded_size(tmp_path, tiny_model):
  lines = write_docs(tmp_path / "train.txt", 40, seed=11)
  long_line = " ".join(lines)  # one document of ~4 k characters among the others
  (tmp_path / "train.txt").write_text("\n".join(lines[:5] + [long_line] + lines[5:]) + "\n", encoding="utf-8")
  task = tasks.register_local_text_task(name="test_long", train_files=str(tmp_path / "train.txt"),
                                        vocabulary_path=tiny_model, max_document_chars=500)
  v = task.output_features["targets"].vocabulary
  lengths = {"inputs": 32, "targets": sc.random_spans_helper(32)[1]}
  docs = []
  for line in lines[:5] + [long_line] + lines[5:]:
    docs += vocab.cut_at_spaces(line, 500)[0]
  assert len(docs) > len(lines) + 5 and max(map(len, docs)) <= 500
  examples = list(task.get_dataset(lengths, split="train", shuffle=False, seed=1).as_numpy_iterator())
  assert stream_of(examples, v) == [t for doc in docs for t in v.encode(doc)]
  with pytest.raises(ConfigError, match=r"^tasks.register_local_text_task.max_document_chars must be a positive "
                                        r"integer, got 0"):  # gin adds its context below the line
    tasks.register_local_text_task(name="test_long", train_files=str(tmp_path / "train.txt"),
                                   vocabulary_path=tiny_model, max_document_chars=0)


_READ_LONG_LINE = MEMORY_PROBE + textwrap.dedent("""
    import json, sys, time
    from topk_transformers.data import tasks
    path, model = sys.argv[1], sys.argv[2]
    task = tasks.register_local_text_task(name="long_line", train_files=path, vocabulary_path=model,
                                          max_document_chars=10_000)
    task.output_features["targets"].vocabulary.tokenizer  # the model loaded before measuring
    limit_data(1 << 30)
    base, start = reset_peak(), time.time()
    ds = task.get_dataset({"inputs": 32, "targets": 8}, split="train", shuffle=False, seed=0)
    examples = [e for _, e in zip(range(3), ds.as_numpy_iterator())]
    print(json.dumps({"examples": len(examples), "s": time.time() - start, "rss": peak() - base}))
""")


def test_a_20_mb_line_is_read_in_bounded_memory(tmp_path, tmp_cache, tiny_model):
  """The line used to be read and tokenised whole: 0.9 GB more for 5 MB, past 8 GB for 50 MB."""
  path = tmp_path / "one_line.txt"
  write_one_line(path, 20)
  out = subprocess.run([sys.executable, "-c", _READ_LONG_LINE, str(path), tiny_model], capture_output=True,
                       text=True, timeout=300, check=False, env=dict(os.environ))
  assert out.returncode == 0, out.stderr[-2000:]
  m = json.loads(out.stdout.strip().splitlines()[-1])
  # Cutting the line into a copy is linear (about 1 s); then only 128 documents of 10 k characters are tokenised.
  assert m["examples"] == 3 and m["s"] < 60 and m["rss"] < 200 << 20, m


def test_a_vocabulary_error_is_one_line_before_tf_data(tmp_path, tmp_cache, capsys):
  """Training the vocabulary inside tf.data's tracing buried its ConfigError in a StagingError traceback."""
  path = tmp_path / "repetitive.txt"
  path.write_text("word " * 200_000 + "\n", encoding="utf-8")
  task = tasks.register_local_text_task(name="test_repetitive", train_files=str(path))
  message = rf"^the text of {path} is too little for a vocabulary of 3996 pieces \(SentencePiece can give at most"
  with pytest.raises(ConfigError, match=message) as err:
    task.get_dataset({"inputs": 32, "targets": 8}, split="train", shuffle=False)
  assert "\n" not in str(err.value)

  from topk_transformers.commands import train as train_command  # pylint: disable=g-import-not-at-top
  status = train_command.main(["--gin_file=t5/runs/cpu_smoke.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                               f"--gin.tasks.register_local_text_task.train_files=['{path}']"])
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" not in err and "StagingError" not in err
  assert re.match(r"error: " + message[1:], [line for line in err.splitlines() if line.strip()][-1])


# ----------------------------------------------------------------------------- embedded corpus


def test_clean_wiki_text():
  raw = ("'''Albedo''' is the ''fraction'' of light&nbsp;reflected ( ).\n==History==\n* It was named , late.\n"
         "== See also ==\n* [[Sun]]\n")
  assert corpus.clean_wiki_text(raw) == "Albedo is the fraction of light reflected. It was named, late."


@pytest.mark.slow
def test_embedded_corpus_and_default_task(tmp_cache):
  paths = corpus.embedded_corpus()
  stats = {split: corpus.text_stats(p) for split, p in paths.items()}
  assert stats["train"]["documents"] >= 80 and 5 <= stats["validation"]["documents"] <= 15
  assert stats["train"]["characters"] > 2_000_000
  text = open(paths["validation"], encoding="utf-8").read()
  for markup in ("'''", "[[", "{{", "==", "&nbsp;"):
    assert markup not in text
  stamp = os.stat(paths["train"]).st_mtime_ns
  assert corpus.embedded_corpus() == paths and os.stat(paths["train"]).st_mtime_ns == stamp
  # The default local task: embedded corpus, vocabulary trained on its train split.
  task = tasks.get_task(tasks.LOCAL_TEXT_TASK)
  v = task.output_features["targets"].vocabulary
  assert v.vocab_size == 4096
  examples = list(task.get_dataset({"inputs": 128, "targets": 29}, split="validation", shuffle=False, seed=0)
                  .take(3).as_numpy_iterator())
  assert [len(e["inputs"]) for e in examples] == [128] * 3
  first_doc = text.splitlines()[0]
  assert v.decode(stream_of(examples, v)[:20]) == v.decode(v.encode(first_doc)[:20])
