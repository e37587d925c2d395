"""seqio Tasks: T5 span-corruption pretraining on C4 and local text files; GLUE for fine-tuning.

These Tasks are registered when this module is imported (cheaply: nothing is read
until a dataset is asked for):

* ``c4_span_corruption``: tfds ``c4/en:3.1.0``, T5's vocabulary
  (``gs://t5-data/vocabs/cc_all.32000.100extra``, 100 extra ids), T5's
  preprocessing: ``text`` -> ``targets``, tokenize, span corruption (noise
  density 0.15, mean span 3), EOS. Feature lengths inputs 512 / targets 114.
* ``local_text_span_corruption``: the same preprocessing over one-document-per-
  line text files. By default the files are the Wikipedia extract shipped by
  gensim (see ``corpus.py``) and the vocabulary a SentencePiece model trained on
  its train split at first use and cached (``vocab.py``).

The GLUE classification Tasks ``glue_<benchmark>_v2`` (sst2, cola, mrpc, ...;
:func:`register_glue_task`) give fine-tuning a real downstream task in T5's text
format ("sst2 sentence: ..." -> "positive").

All come from gin-configurable functions; a run binds their arguments and asks
for the Task with :func:`get_task`, which re-registers the built-in names with
the current bindings::

  tasks.register_c4_span_corruption.vocabulary_path = %VOCABULARY_PATH
  tasks.register_c4_span_corruption.tfds_data_dir = 'gs://my-bucket/tfds'
  tasks.register_local_text_task.train_files = ['/data/my_corpus/train-*.txt']
  tasks.register_local_text_task.validation_files = ['/data/my_corpus/valid.txt']

A missing dataset raises :class:`MissingDataError`, whose one-line message
says what is missing and how to get it; :func:`check_task_data` raises it
before any training starts. A local text file that is missing, empty or not
UTF-8 is a configuration mistake: a one-line ``ConfigError`` that names the file
(and the offset of its first bad byte), raised when the files are first listed,
before anything is read for training. A line of a local file longer than
``max_document_chars`` is read as several documents (``corpus.cut_long_lines``),
so memory is bounded whatever the line lengths; a trained vocabulary is trained
before the tf.data pipeline is built, so its errors are one line too.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf

from topk_transformers.data import corpus as corpus_lib
from topk_transformers.data import vocab as vocab_lib
from topk_transformers.data.span_corruption import span_corruption
from topk_transformers.gin_utils import ConfigError

C4_TASK = "c4_span_corruption"
LOCAL_TEXT_TASK = "local_text_span_corruption"
DEFAULT_C4_TFDS_NAME = "c4/en:3.1.0"
# 3996 pieces + 100 extra ids = 4096 ids.
DEFAULT_LOCAL_VOCAB_SIZE = 3996
# Characters of one document (line) of a local text file: longer ones are cut into several. 128 Ki characters keep
# the embedded corpus's longest article (93 k) whole; span corruption tokenises 128 documents at a time, so this
# bounds its memory (a few hundred MB at most).
DEFAULT_MAX_DOCUMENT_CHARS = 1 << 17

Files = Union[str, Sequence[str]]


class MissingDataError(FileNotFoundError):
  """A Task's data or vocabulary is not there; the message says how to get it."""


class MissingTextFilesError(MissingDataError, ConfigError):
  """A local text Task's files are not where its bindings say: a configuration mistake."""


def output_features(vocabulary: seqio.Vocabulary) -> Dict[str, seqio.Feature]:
  """T5's features: inputs and targets share the vocabulary, both end with EOS."""
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def span_corruption_preprocessors(noise_density: float, mean_noise_span_length: float) -> list:
  """tokenize -> (cache point) -> span corruption -> EOS, on ``{'targets': text}``."""
  return [
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
      functools.partial(span_corruption, noise_density=noise_density,
                        mean_noise_span_length=mean_noise_span_length),
      seqio.preprocessors.append_eos_after_trim,
  ]


def _add_task(name: str, source, vocabulary, preprocessors) -> seqio.Task:
  # Idempotent: re-registering replaces, so tests and re-bound gin configs can call it again.
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, source=source, output_features=output_features(vocabulary),
                                preprocessors=preprocessors, metric_fns=[])


class C4Source(seqio.TfdsDataSource):
  """A read-only ``TfdsDataSource`` whose missing data gives a :class:`MissingDataError`.

  Read-only, so a missing C4 is never "downloaded" by ``tfds.load`` (C4 is
  built from Common Crawl with Apache Beam, not downloaded).
  """

  def _missing(self) -> MissingDataError:
    try:
      where = self.tfds_dataset.builder.data_dir
    except Exception:  # pylint: disable=broad-except
      where = self.tfds_dataset.data_dir or "the default tfds data_dir (~/tensorflow_datasets)"
    return MissingDataError(
        f"tfds dataset {self.tfds_dataset.name!r} is not prepared in {where}: build it with "
        f"`tfds build c4/en --data_dir=DIR` (Apache Beam) or copy a prepared copy to DIR, then "
        f"bind tasks.register_c4_span_corruption.tfds_data_dir = 'DIR'")

  def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **kwargs):
    try:
      return super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)
    except AssertionError as e:  # tfds: "Dataset c4: could not find data in ..."
      if "could not find data" in str(e):
        raise self._missing() from None
      raise

  def num_input_examples(self, split):
    # Unknown without split info: an unprepared C4 already failed in get_dataset,
    # this is tfds.testing.mock_data.
    if not self.tfds_dataset.info.splits:
      return None
    return super().num_input_examples(split)

  def list_shards(self, split):
    try:
      return super().list_shards(split)
    except KeyError:  # an unprepared builder has no split info
      if not self.tfds_dataset.info.splits:
        raise self._missing() from None
      raise


@gin.configurable
def register_c4_span_corruption(name: str = C4_TASK,
                                tfds_name: str = DEFAULT_C4_TFDS_NAME,
                                tfds_data_dir: Optional[str] = None,
                                vocabulary_path: str = vocab_lib.DEFAULT_T5_VOCABULARY_PATH,
                                extra_ids: int = vocab_lib.DEFAULT_EXTRA_IDS,
                                vocabulary: Optional[seqio.Vocabulary] = None,
                                noise_density: float = 0.15,
                                mean_noise_span_length: float = 3.0) -> seqio.Task:
  """Registers (or replaces) T5's C4 span-corruption Task and returns it.

  Args:
    name: the Task name.
    tfds_name: tfds name and version; 3.1.0 is the c4/en that tfds 4.9 builds.
    tfds_data_dir: where the prepared C4 lives (None: tfds' default).
    vocabulary_path: SentencePiece model, read at first use.
    extra_ids: sentinel ids appended to the SentencePiece vocabulary.
    vocabulary: a ready vocabulary, used instead of ``vocabulary_path``.
    noise_density, mean_noise_span_length: span corruption (T5: 0.15, 3).
  """
  vocabulary = vocabulary or vocab_lib.get_vocabulary(vocabulary_path, extra_ids=extra_ids)
  source = C4Source(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, read_only=True,
                    splits={"train": "train", "validation": "validation"})
  preprocessors = [functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"})]
  preprocessors += span_corruption_preprocessors(noise_density, mean_noise_span_length)
  return _add_task(name, source, vocabulary, preprocessors)


class LocalTextSource(seqio.TextLineDataSource):
  """One-document-per-line text files, split -> file patterns.

  The mapping may be a callable (e.g. one that writes the embedded corpus):
  it is called the first time files are listed, not at construction.

  A local file with a line longer than ``max_document_chars`` is read through
  a copy with that line cut into several (:func:`corpus.cut_long_lines`), so
  no document is held or tokenised whole past that size. ``vocabulary``, if it
  is a :class:`vocab.TrainedSentencePieceVocabulary`, is trained (or found in
  its cache) when a dataset is first asked for, before any tf.data pipeline is
  built, so its errors are one line and not a tf.data traceback.
  """

  def __init__(self, split_to_files: Union[Mapping[str, Files], Callable[[], Mapping[str, Files]]],
               splits: Sequence[str] = ("train", "validation"), task_name: str = LOCAL_TEXT_TASK,
               max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
               vocabulary: Optional[seqio.Vocabulary] = None):
    if not isinstance(max_document_chars, int) or max_document_chars < 1:
      raise ConfigError(f"tasks.register_local_text_task.max_document_chars must be a positive integer, "
                        f"got {max_document_chars!r}")
    self._files_fn = split_to_files if callable(split_to_files) else None
    self._task_name = task_name
    self._max_document_chars = max_document_chars
    self._vocabulary = vocabulary
    patterns = {s: () for s in splits} if self._files_fn else dict(split_to_files)
    super().__init__(patterns)

  def list_shards(self, split: str) -> Sequence[str]:
    if self._files_fn is not None:
      self._split_to_filepattern = dict(self._files_fn())
      self._files_fn = None
    patterns = self._split_to_filepattern.get(split)
    files = seqio.utils.list_files(patterns) if patterns else []
    # list_files returns a pattern without wildcards as is, existing or not.
    missing = [f for f in files if not tf.io.gfile.exists(f)]
    bind = f"bind tasks.register_local_text_task.{split}_files = ['/path/to/{split}.txt'] (one document per line)"
    if len(missing) == len(files):
      raise MissingTextFilesError(
          f"task {self._task_name!r}: no text file for split {split!r} (patterns: {patterns!r}); {bind}")
    if missing:
      raise MissingTextFilesError(f"task {self._task_name!r}: {split} file {missing[0]} does not exist; {bind}")
    return [_check_file(path, f"{split} file", self._max_document_chars) for path in files]

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
    self.list_shards(split)  # the files' own one-line errors come first
    if isinstance(self._vocabulary, vocab_lib.TrainedSentencePieceVocabulary):
      self._vocabulary.train_once()
    return super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)


def _check_file(path: str, what: str, max_document_chars: int) -> str:
  """The file to read for ``path``.

  A local file must be non-empty UTF-8 (read once, see ``vocab.check_text_file``); one with a line over
  ``max_document_chars`` is read through a copy with its long lines cut (``corpus.cut_long_lines``). A remote
  file must be non-empty and is read as it is.
  """
  if "://" not in path:
    if vocab_lib.check_text_file(path, what) > max_document_chars:
      return corpus_lib.cut_long_lines(path, max_document_chars)
    return path
  if tf.io.gfile.stat(path).length == 0:
    raise ConfigError(f"{what} {path} is empty: it needs one document per line")
  return path


@seqio.map_over_dataset
@tf.autograph.experimental.do_not_convert
def _line_to_text(line):
  return {"text": line}


def _embedded_splits() -> Dict[str, str]:
  return corpus_lib.embedded_corpus()


def _embedded_train_files():
  return [corpus_lib.embedded_corpus()["train"]]


def _as_list(files: Files):
  return [files] if isinstance(files, str) else list(files)


@gin.configurable
def register_local_text_task(name: str = LOCAL_TEXT_TASK,
                             train_files: Optional[Files] = None,
                             validation_files: Optional[Files] = None,
                             vocabulary_path: Optional[str] = None,
                             vocab_size: int = DEFAULT_LOCAL_VOCAB_SIZE,
                             extra_ids: int = vocab_lib.DEFAULT_EXTRA_IDS,
                             noise_density: float = 0.15,
                             mean_noise_span_length: float = 3.0,
                             max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS) -> seqio.Task:
  """Registers (or replaces) a span-corruption Task over local text files and returns it.

  Args:
    name: the Task name.
    train_files: file paths or glob patterns, one document per line. None:
      the embedded gensim Wikipedia extract (and its validation split).
    validation_files: the same for the "validation" split (None with your own
      train files: the Task has a train split only).
    vocabulary_path: a SentencePiece model to use. None: train one with
      ``vocab_size`` pieces on the train files at first use (cached).
    vocab_size: SentencePiece pieces when training (the vocabulary has
      ``vocab_size + extra_ids`` ids; 3996 + 100 = 4096 by default).
    extra_ids: sentinel ids.
    noise_density, mean_noise_span_length: span corruption.
    max_document_chars: a longer line of a local file is cut at spaces into
      documents of at most this many characters (read through a cached copy),
      so memory stays bounded whatever the line lengths. Span corruption cuts
      documents into pieces of a few hundred tokens anyway; T5 would keep one
      random 65536-token chunk of a longer document, this keeps all of it.
  """
  if train_files is None:
    if validation_files is not None:
      raise ValueError(f"validation_files={validation_files!r} needs train_files too")
    split_to_files = _embedded_splits
    train_for_vocab = _embedded_train_files
  else:
    split_to_files = {"train": _as_list(train_files)}
    if validation_files is not None:
      split_to_files["validation"] = _as_list(validation_files)
    train_for_vocab = functools.partial(seqio.utils.list_files, split_to_files["train"])
  if vocabulary_path:
    vocabulary = vocab_lib.get_vocabulary(vocabulary_path, extra_ids=extra_ids)
  else:
    vocabulary = vocab_lib.TrainedSentencePieceVocabulary(train_for_vocab, vocab_size=vocab_size,
                                                          name=name, extra_ids=extra_ids)
  source = LocalTextSource(split_to_files, task_name=name, max_document_chars=max_document_chars,
                           vocabulary=vocabulary)
  preprocessors = [_line_to_text, functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"})]
  preprocessors += span_corruption_preprocessors(noise_density, mean_noise_span_length)
  return _add_task(name, source, vocabulary, preprocessors)


# ------------------------------------------------------------------------------------------------------ GLUE
# T5's GLUE format (Raffel et al., 2020, appendix D): "<benchmark> <key>: <text> <key>: <text>" over the
# text features in sorted order -> the label's name. tfds prepares GLUE itself (`tfds build glue/sst2`).
GLUE_LABELS = {
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"), "wnli": ("not_entailment", "entailment"),
}
GLUE_TEXT_FEATURES = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "mnli": ("hypothesis", "premise"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}
GLUE_TFDS_VERSION = "2.0.0"


class GlueSource(seqio.TfdsDataSource):
  """GLUE from tfds; before tfds has prepared it (or under ``tfds.testing.mock_data``) size and files are unknown."""

  def num_input_examples(self, split):
    if not self.tfds_dataset.info.splits:
      return None
    return super().num_input_examples(split)

  def list_shards(self, split):
    if not self.tfds_dataset.info.splits:
      return [split]  # files unknown yet (tfds prepares GLUE at first use): hosts shard the examples
    return super().list_shards(split)


def glue_task_name(benchmark: str) -> str:
  return f"glue_{benchmark}_v2"


def glue_formatter(benchmark: str) -> Callable:
  """``{'sentence': ..., 'label': 1}`` -> ``{'inputs': 'sst2 sentence: ...', 'targets': 'positive'}``."""
  keys = GLUE_TEXT_FEATURES[benchmark]
  names = tf.constant(GLUE_LABELS[benchmark])

  @seqio.map_over_dataset
  @tf.autograph.experimental.do_not_convert
  def fmt(example):
    parts = [benchmark]
    for key in keys:
      parts += [f"{key}:", example[key]]
    label = tf.cast(example["label"], tf.int32)
    # The test split's label is -1: it has no answer to learn.
    target = tf.where(label >= 0, tf.gather(names, tf.maximum(label, 0)), tf.constant("<unk>"))
    return {"inputs": tf.strings.join(parts, separator=" "), "targets": target}

  return fmt


@gin.configurable
def register_glue_task(benchmark: str = "sst2",
                       tfds_data_dir: Optional[str] = None,
                       vocabulary_path: str = vocab_lib.DEFAULT_T5_VOCABULARY_PATH,
                       extra_ids: int = vocab_lib.DEFAULT_EXTRA_IDS,
                       vocabulary: Optional[seqio.Vocabulary] = None,
                       name: Optional[str] = None) -> seqio.Task:
  """Registers (or replaces) the GLUE classification Task ``glue_<benchmark>_v2`` (T5's format) and returns it.

  Args:
    benchmark: one of ``GLUE_LABELS`` (cola, sst2, mrpc, qqp, mnli, qnli, rte, wnli).
    tfds_data_dir: where tfds keeps ``glue`` (None: its default).
    vocabulary_path, extra_ids: the SentencePiece model (a Hugging Face checkpoint's ``spiece.model``
      with ``extra_ids=100``, or T5's ``cc_all.32000.100extra`` with 0).
    vocabulary: a ready vocabulary, used instead of ``vocabulary_path``.
    name: the Task name (default ``glue_<benchmark>_v2``).
  """
  if benchmark not in GLUE_LABELS:
    raise ConfigError(f"unknown GLUE benchmark {benchmark!r}; choose from {', '.join(GLUE_LABELS)}")
  vocabulary = vocabulary or vocab_lib.get_vocabulary(vocabulary_path, extra_ids=extra_ids)
  validation = "validation_matched" if benchmark == "mnli" else "validation"
  source = GlueSource(tfds_name=f"glue/{benchmark}:{GLUE_TFDS_VERSION}", tfds_data_dir=tfds_data_dir,
                                splits={"train": "train", "validation": validation})
  preprocessors = [glue_formatter(benchmark), seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                   seqio.preprocessors.append_eos_after_trim]
  return _add_task(name or glue_task_name(benchmark), source, vocabulary, preprocessors)


_BUILTIN_TASKS = {C4_TASK: register_c4_span_corruption, LOCAL_TEXT_TASK: register_local_text_task}
_BUILTIN_TASKS.update({glue_task_name(b): functools.partial(register_glue_task, b) for b in GLUE_LABELS})


def get_task(name: str) -> seqio.Task:
  """The Task (or Mixture) ``name``; the built-in ones are re-registered with the gin bindings."""
  if name in _BUILTIN_TASKS:
    return _BUILTIN_TASKS[name]()
  return seqio.get_mixture_or_task(name)


def check_task_data(task: Union[str, seqio.Task], splits: Sequence[str] = ("train",)) -> None:
  """Raises :class:`MissingDataError` (one line) if a split or the vocabulary file is missing.

  Builds the source datasets without reading them, so it costs little. Remote
  vocabulary paths (``gs://``) are not checked.
  """
  task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
  for split in splits:
    if split not in task.source.splits:
      raise MissingDataError(f"task {task.name!r} has no split {split!r} (it has {sorted(task.source.splits)})")
    task.source.get_dataset(split=split, shuffle=False)
  for feature in task.output_features.values():
    vocabulary = feature.vocabulary
    if isinstance(vocabulary, vocab_lib.TrainedSentencePieceVocabulary):
      continue
    path = getattr(vocabulary, "sentencepiece_model_file", "")
    if path and "://" not in path and not tf.io.gfile.exists(path):
      raise MissingDataError(f"task {task.name!r}: SentencePiece model {path!r} not found")


# Registered at import with the default arguments (reads nothing); get_task() re-registers with gin's.
register_c4_span_corruption()
register_local_text_task()
for _benchmark in GLUE_LABELS:
  register_glue_task(_benchmark)
