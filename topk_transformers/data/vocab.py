"""SentencePiece vocabularies: T5's, or one trained on a local corpus and cached.

* :func:`get_vocabulary` wraps a SentencePiece model file (T5's
  ``cc_all.32000.100extra`` by default) as a ``seqio.SentencePieceVocabulary``
  with 100 extra ids, the span-corruption sentinels (``<extra_id_0>`` is the
  last id).
* :func:`train_sentencepiece` trains a T5-like unigram model (pad=0, eos=1,
  unk=2, no bos) on text files. The result is cached: a JSON file next to the
  model records a fingerprint of the corpus contents and the settings, and a
  model whose fingerprint matches is reused instead of retrained. Files are
  written under a temporary name and renamed, so a killed run never leaves a
  model that looks valid.
* :class:`TrainedSentencePieceVocabulary` is a seqio vocabulary that runs that
  training the first time it is used (not when it is constructed), so a Task
  can be registered at import time for free.

* :func:`check_text_file` rejects a training text file that is missing, empty
  (or only blank lines) or not UTF-8, with a one-line :class:`ConfigError`
  naming the file (and the offset of the first bad byte), before anything reads
  it for training. It returns the file's longest line in bytes.

Every file is read in blocks (:func:`line_pieces`), never a whole line at once:
training a vocabulary takes time linear in the files and bounded memory,
however long their lines.

The cache root is :func:`cache_dir`: a gin binding
(``vocab.cache_dir.path = '...'``), else ``$TOPK_TRANSFORMERS_CACHE``, else
``~/.cache/topk_transformers``.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
import re
import time
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import gin
import seqio
import sentencepiece as spm

from topk_transformers.gin_utils import ConfigError

DEFAULT_T5_VOCABULARY_PATH = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
DEFAULT_EXTRA_IDS = 100
CACHE_ENV_VAR = "TOPK_TRANSFORMERS_CACHE"

TextFiles = Union[Sequence[str], Callable[[], Sequence[str]]]


class MissingTextFileError(ConfigError, FileNotFoundError):
  """A text file that does not exist: a configuration mistake, and a ``FileNotFoundError``."""


# (path, size, mtime) of the local files check_text_file has accepted -> their longest line in bytes: each
# file is read once per process.
_accepted_files: dict = {}
_READ_BLOCK = 1 << 20


def check_text_file(path: str, what: str = "text file") -> int:
  """Raises a one-line :class:`ConfigError` unless ``path`` holds some UTF-8 text; returns its longest line.

  Missing (:class:`MissingTextFileError`), empty or only whitespace, or not
  valid UTF-8 (the message gives the byte offset and line of the first bad
  byte). Reads the file once, in blocks; a file already accepted and not
  changed since is not read again. ``what`` names the file's role in the
  message, e.g. ``"train file"``.

  Returns:
    The length in bytes of the file's longest line (between ``\\n`` bytes), so a
    reader can tell whether any line needs cutting.
  """
  path = os.fspath(path)
  try:
    stat = os.stat(path)
  except FileNotFoundError:
    raise MissingTextFileError(f"{what} {path} does not exist") from None
  if os.path.isdir(path):
    raise ConfigError(f"{what} {path} is a directory, not a text file")
  key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
  if key in _accepted_files:
    return _accepted_files[key]
  if stat.st_size == 0:
    raise ConfigError(f"{what} {path} is empty: it needs one document per line")
  carry = b""  # the start of a character cut by the block boundary
  offset = 0  # file offset of carry + block
  newlines = 0
  has_text = False
  line, longest = 0, 0  # bytes of the current line so far; of the longest line ended
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_READ_BLOCK), b""):
      data = carry + block
      try:
        _, consumed = codecs.utf_8_decode(data, "strict", False)
      except UnicodeDecodeError as e:
        line = newlines + data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{what} {path} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset {offset + e.start} "
                          f"(line {line}); convert it to UTF-8, e.g. with iconv -f latin1 -t utf-8") from None
      has_text = has_text or bool(data.strip())
      newlines += block.count(b"\n")
      lines = block.split(b"\n")
      if len(lines) > 1:
        longest = max(longest, line + len(lines[0]), max(map(len, lines[1:-1]), default=0))
        line = 0
      line += len(lines[-1])
      carry, offset = data[consumed:], offset + consumed
  if carry:
    raise ConfigError(f"{what} {path} is not UTF-8: it ends inside a character, at byte offset {offset}")
  if not has_text:
    raise ConfigError(f"{what} {path} has no text, only blank lines: it needs one document per line")
  _accepted_files[key] = longest = max(longest, line)
  return longest


@gin.configurable
def cache_dir(path: Optional[str] = None) -> str:
  """Root of the project's caches (corpus, trained vocabularies)."""
  path = path or os.environ.get(CACHE_ENV_VAR) or os.path.join("~", ".cache", "topk_transformers")
  return os.path.expanduser(path)


@gin.configurable
def get_vocabulary(path: str = DEFAULT_T5_VOCABULARY_PATH,
                   extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """A seqio SentencePiece vocabulary; the model file is read lazily, at first use."""
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SPACES = re.compile(r"\s*")
# Characters read at a time: a line is never held whole, whatever its length.
_TEXT_BLOCK_CHARS = 1 << 20


def line_pieces(path: str, block_chars: int = _TEXT_BLOCK_CHARS) -> Iterator[Tuple[str, bool]]:
  """``(text, ends_line)`` pieces of the lines of a UTF-8 file, each at most ``block_chars`` long.

  The file is read ``block_chars`` characters at a time (universal newlines, as
  ``for line in f``), so memory stays bounded and time linear however long a
  line is. ``text`` has no newline; ``ends_line`` is True on the last piece of
  each line (the file's last line included, with or without a final newline).
  """
  pending = False  # a line has started and not ended
  with open(path, encoding="utf-8") as f:
    for block in iter(lambda: f.read(block_chars), ""):
      start = 0
      while True:
        nl = block.find("\n", start)
        if nl < 0:
          if start < len(block):
            yield block[start:], False
            pending = True
          break
        yield block[start:nl], True
        pending = False
        start = nl + 1
  if pending:
    yield "", True


def cut_at_spaces(text: str, max_chars: int, final: bool = True) -> Tuple[list, str]:
  """Cuts ``text`` into pieces of at most ``max_chars``, each at its last space if it has one.

  Returns ``(pieces, rest)``: with ``final`` the rest is empty (every piece is
  returned); without, ``rest`` is the end whose cut depends on text that has
  not come yet (at most ``max_chars`` characters and trailing whitespace). Leading whitespace after a
  cut is dropped. Indexes into ``text`` rather than copying what remains, so the
  time is linear in its length.
  """
  pieces, start, n = [], 0, len(text)
  # Unfinished text: trailing whitespace may yet be stripped at the line's end, so it decides no cut.
  known = n if final else len(text.rstrip())
  while known - start > max_chars:
    cut = text.rfind(" ", start, start + max_chars)
    cut = cut if cut > start else start + max_chars
    pieces.append(text[start:cut])
    start = _SPACES.match(text, cut).end()
  if final:
    if start < n:
      pieces.append(text[start:])
    return pieces, ""
  # Whitespace more than max_chars past the rest can end up in no piece (a cut skips it): keep the rest bounded.
  return pieces, text[start:known + max_chars + 1]


def _sentences(text_files: Sequence[str], max_chars: int,
               block_chars: int = _TEXT_BLOCK_CHARS) -> Iterator[str]:
  """Sentences of one-document-per-line files, each at most ``max_chars`` long.

  SentencePiece silently skips training lines longer than its
  ``max_sentence_length``; a Wikipedia article on one line would be lost whole,
  so a longer sentence is cut at a space. The files are read in blocks of
  ``block_chars`` (see :func:`line_pieces`): the time is linear in the file and
  the memory bounded, whatever the line lengths. The sentences are those of
  splitting each stripped line at the whitespace after ``.!?``.
  """
  for path in text_files:
    carry = ""  # the unfinished sentence; it starts with a non-space (or is empty)
    for text, ends_line in line_pieces(path, block_chars):
      text = carry + text if carry else text.lstrip()
      if ends_line:
        text = text.rstrip()
      sentences = _SENTENCE_END.split(text)
      tail = "" if ends_line else sentences.pop()
      for sentence in sentences:
        yield from cut_at_spaces(sentence, max_chars)[0]
      pieces, carry = cut_at_spaces(tail, max_chars, final=False)
      yield from pieces


def corpus_fingerprint(text_files: Sequence[str], settings: dict) -> str:
  """sha256 of the settings and of every file's bytes, in order."""
  h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  for path in text_files:
    h.update(b"\0file\0")
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


def train_sentencepiece(text_files: Sequence[str],
                        model_prefix: str,
                        vocab_size: int,
                        *,
                        model_type: str = "unigram",
                        character_coverage: float = 0.9995,
                        input_sentence_size: int = 1_000_000,
                        max_sentence_chars: int = 2000,
                        seed_sentencepiece_size: Optional[int] = None,
                        shrinking_factor: float = 0.5,
                        num_sub_iterations: int = 1,
                        hard_vocab_limit: bool = True,
                        seed: int = 0,
                        num_threads: Optional[int] = None) -> str:
  """Trains (or reuses) ``<model_prefix>.model``; returns its path.

  Args:
    text_files: one document per line, UTF-8; a missing, empty or non-UTF-8 file
      is a :class:`ConfigError` (see :func:`check_text_file`), raised before
      anything is written.
    model_prefix: writes ``<model_prefix>.model`` and ``<model_prefix>.json``
      (the fingerprint of corpus and settings that makes the cache valid).
    vocab_size: number of SentencePiece pieces, pad/eos/unk included; seqio adds
      the extra ids on top.
    model_type: "unigram" (T5) or "bpe".
    character_coverage: fraction of characters covered by the alphabet; the
      rest map to unk.
    input_sentence_size: cap on the sentences SentencePiece samples, which keeps
      training fast on large corpora.
    max_sentence_chars: longer sentences are cut at a space.
    seed_sentencepiece_size, shrinking_factor, num_sub_iterations: unigram
      training effort. The defaults (seed pieces max(20000, 5 * vocab_size),
      halve the candidates per round, one EM sub-iteration) train on the 2.6 MB
      embedded corpus in ~5 CPU-seconds instead of ~17 with SentencePiece's own
      defaults (1M, 0.75, 2), for the same tokens per sentence within 0.5%.
    hard_vocab_limit: False lets a tiny corpus give fewer pieces than asked.
    seed: SentencePiece's sampling seed, for reproducible models.
    num_threads: training threads (default: all cores).

  Returns:
    The path of the ``.model`` file.
  """
  text_files = [os.fspath(p) for p in text_files]
  if not text_files:
    raise ValueError("train_sentencepiece needs at least one text file, got none")
  for path in text_files:
    check_text_file(path, "SentencePiece training file")
  if vocab_size < 8:
    raise ValueError(f"vocab_size must be >= 8, got {vocab_size!r}")
  if seed_sentencepiece_size is None:
    seed_sentencepiece_size = max(20_000, 5 * vocab_size)
  settings = dict(vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                  input_sentence_size=input_sentence_size, max_sentence_chars=max_sentence_chars,
                  seed_sentencepiece_size=seed_sentencepiece_size, shrinking_factor=shrinking_factor,
                  num_sub_iterations=num_sub_iterations, hard_vocab_limit=hard_vocab_limit, seed=seed,
                  sentencepiece=spm.__version__)
  fingerprint = corpus_fingerprint(text_files, settings)
  model_path, meta_path = model_prefix + ".model", model_prefix + ".json"
  if os.path.exists(model_path) and os.path.exists(meta_path):
    try:
      with open(meta_path, encoding="utf-8") as f:
        if json.load(f).get("fingerprint") == fingerprint:
          return model_path
    except ValueError:  # a corrupt sidecar means retrain
      pass

  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  start = time.time()
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  # model_writer keeps the output path out of the model proto, so equal corpora
  # give byte-identical models wherever they are trained.
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(text_files, max_sentence_chars),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        shrinking_factor=shrinking_factor,
        num_sub_iterations=num_sub_iterations,
        max_sentence_length=4 * max_sentence_chars + 16,  # bytes; UTF-8 is at most 4 per char
        hard_vocab_limit=hard_vocab_limit,
        # T5's ids: 0 pad, 1 eos, 2 unk, no bos. seqio relies on pad=0, eos=1.
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2)
  except RuntimeError as e:
    # A corpus too small for vocab_size; SentencePiece says how many pieces it can give.
    too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
    if not too_high:
      raise
    raise ConfigError(f"the text of {', '.join(text_files)} is too little for a vocabulary of {vocab_size} pieces "
                      f"(SentencePiece can give at most {too_high.group(1)}): lower vocab_size, e.g. "
                      "tasks.register_local_text_task.vocab_size, or add text") from None
  seconds = time.time() - start
  _write_atomic(model_path, model.getvalue())
  # The sidecar goes last: it is what marks the model as complete.
  meta = {"fingerprint": fingerprint, "settings": settings, "text_files": text_files,
          "train_seconds": round(seconds, 3)}
  _write_atomic(meta_path, json.dumps(meta, indent=1).encode())
  # seqio memoises loaded models by path; drop a stale copy of a model just replaced.
  loader = getattr(seqio.vocabularies, "_load_model_internal", None)
  if loader is not None and hasattr(loader, "cache_clear"):
    loader.cache_clear()
  logging.info("Trained SentencePiece model %s (%d pieces) in %.1fs", model_path, vocab_size, seconds)
  return model_path


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def default_model_prefix(name: str, text_files: Sequence[str], vocab_size: int) -> str:
  """``<cache>/spm/<name>-<vocab_size>-<hash of the file paths>``: one cache per corpus."""
  digest = hashlib.sha256("\0".join(os.path.abspath(p) for p in text_files).encode()).hexdigest()[:10]
  return os.path.join(cache_dir(), "spm", f"{name}-{vocab_size}-{digest}")


class TrainedSentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary trained on ``text_files`` when first used.

  ``text_files`` may be a callable returning the paths (e.g. one that writes
  the embedded corpus first), so constructing the vocabulary touches no file.
  Training goes through :func:`train_sentencepiece`, hence its cache.
  """

  def __init__(self, text_files: TextFiles, vocab_size: int, model_prefix: Optional[str] = None,
               name: str = "local", extra_ids: int = DEFAULT_EXTRA_IDS, **train_kwargs):
    self._text_files = text_files if callable(text_files) else tuple(text_files)
    self._vocab_size_to_train = vocab_size
    self._model_prefix = model_prefix
    self._name = name
    self._train_kwargs = train_kwargs
    # The real path is known once the files are; seqio reads it only through _model_context.
    super().__init__(sentencepiece_model_file="", extra_ids=extra_ids)

  def train(self) -> str:
    """Trains (or finds in the cache) the model; returns its path."""
    files = list(self._text_files() if callable(self._text_files) else self._text_files)
    prefix = self._model_prefix or default_model_prefix(self._name, files, self._vocab_size_to_train)
    return train_sentencepiece(files, prefix, self._vocab_size_to_train, **self._train_kwargs)

  def train_once(self) -> str:
    """Trains the model if this vocabulary has not yet (see :meth:`train`); returns its path."""
    if not self._sentencepiece_model_file:
      self._sentencepiece_model_file = self.train()
    return self._sentencepiece_model_file

  def _model_context(self):
    if not self._sentencepiece_model_file:
      self._sentencepiece_model_file = self.train()
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    if not self._sentencepiece_model_file:
      self._sentencepiece_model_file = self.train()
    return self._sentencepiece_model_file
