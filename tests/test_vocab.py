"""vocab.py reads text in blocks: sentences for SentencePiece in linear time and bounded memory, whatever the lines."""

import json
import os
import random
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from topk_transformers.data import vocab

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def reference_sentences(path, max_chars):
  """What the sentences are (and were before the block reader): each stripped line split after .!?, cut at spaces."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      for sentence in _SENTENCE_END.split(line.strip()):
        while len(sentence) > max_chars:
          cut = sentence.rfind(" ", 0, max_chars)
          cut = cut if cut > 0 else max_chars
          yield sentence[:cut]
          sentence = sentence[cut:].lstrip()
        if sentence:
          yield sentence


def test_block_reader_gives_the_same_sentences_whatever_the_block_size(tmp_path):
  rng = random.Random(0)
  alphabet = ["a", "bb", " ", "  ", ".", "!", "\t", "\n", "é", "xyz", ". ", "\r\n", "\r", " " * 15, "\t " * 7]
  path = tmp_path / "r.txt"
  for _ in range(3000):
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
    path.write_text(text, encoding="utf-8", newline="")
    max_chars, block = rng.randint(1, 12), rng.randint(1, 20)
    expected = list(reference_sentences(path, max_chars))
    assert list(vocab._sentences([str(path)], max_chars, block_chars=block)) == expected, (text, max_chars, block)
    assert all(0 < len(s) <= max_chars for s in expected)


def test_line_pieces_are_bounded_and_give_back_the_lines(tmp_path):
  path = tmp_path / "a.txt"
  path.write_bytes("first line\r\nsecond, much longer line é\n\nno newline at the end".encode())
  pieces = list(vocab.line_pieces(str(path), block_chars=4))
  assert all(len(text) <= 4 for text, _ in pieces)
  lines, current = [], ""
  for text, ends_line in pieces:
    current += text
    if ends_line:
      lines.append(current)
      current = ""
  assert lines == ["first line", "second, much longer line é", "", "no newline at the end"]


def test_check_text_file_returns_the_longest_line_in_bytes(tmp_path, monkeypatch):
  monkeypatch.setattr(vocab, "_READ_BLOCK", 7)  # lines straddle the read blocks
  path = tmp_path / "a.txt"
  path.write_bytes(b"ab\n" + "é".encode() * 10 + b"\nxyz\n" + b"q" * 12)
  assert vocab.check_text_file(str(path)) == 20
  assert vocab.check_text_file(str(path)) == 20, "the cached answer"
  path.write_bytes(b"short\n" + b"w " * 30 + b"\n")
  assert vocab.check_text_file(str(path)) == 60


# Run in a fresh process with only vocab.py's imports. The peak resident memory (VmHWM) is reset before each phase
# (clear_refs 5), so the increase is this code path's; where it cannot be reset the measure is the peak over the
# resident memory at the start, an overestimate. A data limit of 1 GiB above what the imports map stops a quadratic or
# whole-line regression before it takes the machine's memory.
MEMORY_PROBE = textwrap.dedent("""
    import resource

    def _status(key):
      return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":")][0]

    def limit_data(extra):
      resource.setrlimit(resource.RLIMIT_DATA, (_status("VmData") + extra, resource.RLIM_INFINITY))

    def reset_peak():
      try:
        with open("/proc/self/clear_refs", "w") as f:
          f.write("5")
      except OSError:
        pass
      return _status("VmRSS")

    def peak():
      return _status("VmHWM")
""")

_MEASURE = MEMORY_PROBE + textwrap.dedent("""
    import json, sys, time
    from topk_transformers.data import vocab
    path, prefix = sys.argv[1], sys.argv[2]
    limit_data(1 << 30)
    base, start = reset_peak(), time.time()
    count = sum(1 for _ in vocab._sentences([path], 2000))
    out = {"sentences": count, "sentences_s": time.time() - start, "sentences_rss": peak() - base}
    base, start = reset_peak(), time.time()
    vocab.train_sentencepiece([path], prefix, vocab_size=100, input_sentence_size=1000)
    out.update(train_s=time.time() - start, train_rss=peak() - base)
    print(json.dumps(out))
""")


def write_one_line(path, megabytes):
  """``megabytes`` MB of random words on one line, without a sentence end: the worst case for cutting."""
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghijklmnop"), size=3 + i % 6)) for i in range(3000)]
  block = " ".join(rng.choice(words, size=200_000))[:1_000_000]
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(megabytes):
      f.write(block + " ")
    f.write("\n")


def test_vocabulary_training_on_a_40_mb_line_is_linear_and_bounded(tmp_path):
  """Cutting used to copy the rest of the line per 2000-character piece: minutes and the line held twice."""
  path = tmp_path / "one_line.txt"
  write_one_line(path, 40)
  out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(tmp_path / "m")], capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  m = json.loads(out.stdout.strip().splitlines()[-1])
  assert m["sentences"] >= 40_000_000 // 2000
  # Linear: about 1 s here; the quadratic cut took minutes. Bounded: a 1 MiB block, not the 40 MB line.
  assert m["sentences_s"] < 20 and m["sentences_rss"] < 32 << 20, m
  # SentencePiece keeps its sample (input_sentence_size sentences), not the file.
  assert m["train_s"] < 90 and m["train_rss"] < 300 << 20, m
  assert os.path.exists(tmp_path / "m.model")
