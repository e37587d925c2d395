"""The embedded text corpus: the Wikipedia extract that gensim's wheel ships.

``gensim`` carries a shortened English Wikipedia dump in its test data
(``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
1.7 MB compressed, about 100 real articles). It is the project's default
pretraining corpus, so the CPU smoke run needs no download.

:func:`embedded_corpus` parses it once with gensim's own wiki helpers
(``extract_pages``, ``filter_wiki``), cleans the remaining markup while keeping
case and punctuation (so SentencePiece learns real text), and writes one
article per line to ``<cache>/corpus/<name>/{train,validation}.txt``.
Every ``validation_every``-th article is held out for validation. Files are
written atomically (temporary file + rename) and reused on later calls.

:func:`cut_long_lines` gives a text file whose lines (documents) are at most a
number of characters: the file itself when they are, else a cached copy in
which each longer line is cut at spaces into lines of at most that many, read
and written a block at a time. The local text Task reads that copy, so no
document is ever held, tokenised or span-corrupted whole beyond that size.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
from typing import Dict, Iterator, Tuple

import gin

from topk_transformers.data import vocab as vocab_lib

GENSIM_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the cleaning changes, so stale cached corpora are rewritten.
CORPUS_VERSION = 1
SPLITS = ("train", "validation")

# Trailing sections that are mostly lists of links and citations.
_TRAILING_SECTIONS = ("see also", "references", "external links", "further reading", "notes",
                      "bibliography", "sources", "footnotes", "citations")
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_BOLD_ITALIC = re.compile(r"'{2,}")
_LIST_PREFIX = re.compile(r"^[*#:;]+\s*")
_HTML_ENTITY = re.compile(r"&(nbsp|ndash|mdash|amp|quot|lt|gt);")
_ENTITIES = {"nbsp": " ", "ndash": "–", "mdash": "—", "amp": "&", "quot": '"', "lt": "<", "gt": ">"}
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:])")


def gensim_wiki_path() -> str:
  """Path of the Wikipedia extract inside the installed gensim wheel."""
  try:
    import gensim  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError("the embedded corpus needs gensim: pip install 'topk-transformers[demo]' "
                            "(or point the local text task at your own files)") from None
  path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", GENSIM_WIKI_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"gensim {gensim.__version__} does not ship {GENSIM_WIKI_FILE} (looked at {path})")
  return path


def clean_wiki_text(text: str) -> str:
  """Turns a ``filter_wiki`` output into one line of plain prose.

  ``filter_wiki`` removes templates, links and tables but leaves headings,
  bold/italic quotes and list markers. Headings are dropped, the article is cut
  at its first trailing section ("See also", "References", ...), list markers
  are stripped, whitespace is collapsed so the article fits on one line.
  """
  kept = []
  for line in text.splitlines():
    heading = _HEADING.match(line)
    if heading:
      if heading.group(2).strip().lower() in _TRAILING_SECTIONS:
        break
      continue
    line = _LIST_PREFIX.sub("", line.strip())
    if line:
      kept.append(line)
  out = " ".join(kept)
  out = _BOLD_ITALIC.sub("", out)
  out = _HTML_ENTITY.sub(lambda m: _ENTITIES[m.group(1)], out)
  out = _EMPTY_BRACKETS.sub("", out)  # left behind by removed templates, e.g. "Greek ( )"
  out = _SPACES.sub(" ", out)
  out = _SPACE_BEFORE_PUNCT.sub(r"\1", out)
  return out.strip()


def iter_wiki_articles(path: str, min_chars: int = 200) -> Iterator[Tuple[str, str]]:
  """Yields ``(title, one_line_text)`` for the articles of a Wikipedia XML dump.

  Redirects, non-article namespaces and articles shorter than ``min_chars``
  after cleaning are skipped.
  """
  from gensim.corpora import wikicorpus  # pylint: disable=g-import-not-at-top
  with bz2.open(path, "rb") as f:
    for title, raw, _ in wikicorpus.extract_pages(f, filter_namespaces=("0",)):
      if raw.lstrip().lower().startswith("#redirect"):
        continue
      text = clean_wiki_text(wikicorpus.filter_wiki(raw))
      if len(text) >= min_chars:
        yield title, text


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def text_stats(path: str) -> Dict[str, int]:
  """Documents (non-empty lines), characters and whitespace-separated words of a text file."""
  docs = chars = words = 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.rstrip("\n")
      if line.strip():
        docs += 1
        chars += len(line)
        words += len(line.split())
  return {"documents": docs, "characters": chars, "words": words}


def cut_long_lines(path: str, max_chars: int, cache_dir: str | None = None) -> str:
  """``path`` if no line is longer than ``max_chars`` characters, else a copy with the longer lines cut.

  A longer line becomes several lines of at most ``max_chars`` characters, each
  cut at its last space (at ``max_chars`` if it has none); whitespace at a cut
  is dropped, shorter lines are copied unchanged. The copy lives in
  ``<cache_dir>/<hash of path, size, mtime and max_chars>-<name>`` (default
  ``<vocab.cache_dir()>/text``), is written atomically and reused while the
  file is unchanged. Time is linear in the file and memory bounded by about
  ``2 * max_chars`` plus a read block, however long the lines.

  ``path`` must have passed :func:`vocab.check_text_file` (which measures the
  longest line in bytes, an upper bound on its characters).
  """
  if max_chars < 1:
    raise ValueError(f"max_chars must be >= 1, got {max_chars!r}")
  if vocab_lib.check_text_file(path) <= max_chars:
    return path
  stat = os.stat(path)
  key = json.dumps([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, max_chars])
  out_dir = cache_dir or os.path.join(vocab_lib.cache_dir(), "text")
  out = os.path.join(out_dir, f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-{os.path.basename(path)}")
  if os.path.exists(out):
    return out
  os.makedirs(out_dir, exist_ok=True)
  tmp = f"{out}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    carry, written = "", False  # written: this line has given a line of the copy
    for text, ends_line in vocab_lib.line_pieces(path):
      pieces, carry = vocab_lib.cut_at_spaces(carry + text, max_chars, final=ends_line)
      for piece in pieces:
        f.write(piece + "\n")
      written = written or bool(pieces)
      if ends_line:
        if not written:
          f.write("\n")  # an empty line stays one
        written = False
  os.replace(tmp, out)
  return out


@gin.configurable
def embedded_corpus(cache_dir: str | None = None, validation_every: int = 10) -> Dict[str, str]:
  """Writes (once) and returns ``{'train': path, 'validation': path}`` of the gensim extract.

  Args:
    cache_dir: where to write; defaults to ``<vocab.cache_dir()>/corpus``.
    validation_every: article ``i`` goes to validation when ``i % validation_every
      == validation_every - 1``, a deterministic ~10% hold-out.
  """
  if validation_every < 2:
    raise ValueError(f"validation_every must be >= 2, got {validation_every!r}")
  source = gensim_wiki_path()
  out_dir = os.path.join(cache_dir or os.path.join(vocab_lib.cache_dir(), "corpus"),
                         f"gensim_enwiki_v{CORPUS_VERSION}_every{validation_every}")
  paths = {split: os.path.join(out_dir, f"{split}.txt") for split in SPLITS}
  stats_path = os.path.join(out_dir, "stats.json")
  # The stats file is written last: if it names this source, both splits are complete.
  key = {"source": GENSIM_WIKI_FILE, "source_bytes": os.path.getsize(source), "version": CORPUS_VERSION,
         "validation_every": validation_every}
  if os.path.exists(stats_path) and all(os.path.exists(p) for p in paths.values()):
    with open(stats_path, encoding="utf-8") as f:
      if json.load(f).get("key") == key:
        return paths
  os.makedirs(out_dir, exist_ok=True)
  lines = {split: [] for split in SPLITS}
  for i, (_, text) in enumerate(iter_wiki_articles(source)):
    split = "validation" if i % validation_every == validation_every - 1 else "train"
    lines[split].append(text)
  for split in SPLITS:
    _write_atomic(paths[split], "".join(line + "\n" for line in lines[split]))
  stats = {split: text_stats(paths[split]) for split in SPLITS}
  _write_atomic(stats_path, json.dumps({"key": key, "stats": stats}, indent=1))
  return paths


def embedded_corpus_stats(**kwargs) -> Dict[str, Dict[str, int]]:
  """Per split: documents, characters and words of the embedded corpus."""
  return {split: text_stats(path) for split, path in embedded_corpus(**kwargs).items()}
