"""huge_pages.back: which ranges it advises, that values survive, and that the kernel really backs them."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import huge_pages

MIB = 1 << 20


def _anon_huge_kib(address: int) -> int:
  """AnonHugePages (KiB) of the mapping of this process that holds ``address``."""
  hit, total = False, 0
  with open("/proc/self/smaps", encoding="ascii") as f:
    for line in f:
      head = line.split()[0]
      if "-" in head and not head.endswith(":"):
        lo, hi = (int(v, 16) for v in head.split("-"))
        hit = lo <= address < hi
      elif hit and head == "AnonHugePages:":
        total += int(line.split()[1])
  return total


def _fake_madvise(monkeypatch, result=0):
  calls = []

  def madvise(start, length, advice):
    calls.append((start, length, advice))
    return result

  monkeypatch.setattr(huge_pages, "_madvise", lambda: (madvise, ""))
  return calls


def test_advises_exactly_the_whole_aligned_2mib_pages_inside_each_buffer(monkeypatch):
  calls = _fake_madvise(monkeypatch)
  big = jnp.asarray(np.arange(5 * MIB // 4, dtype=np.float32)) + 1  # 5 MiB: holds at least one whole aligned page
  small = jnp.ones((1000,), jnp.float32)  # 4 KB: no whole page
  host = np.ones((5 * MIB,), np.uint8)
  report = huge_pages.back({"big": big, "small": small, "host": host})
  assert report["bytes"] == big.nbytes + small.nbytes + host.nbytes
  by_start = {}
  for start, length, advice in calls:
    assert advice == huge_pages.MADV_COLLAPSE
    assert start % huge_pages.HUGE_PAGE == 0 and length % huge_pages.HUGE_PAGE == 0 and length > 0
    by_start[start] = length
  for address, nbytes in ((big.unsafe_buffer_pointer(), big.nbytes), (host.ctypes.data, host.nbytes)):
    first = -(-address // huge_pages.HUGE_PAGE) * huge_pages.HUGE_PAGE  # the first page boundary inside
    last = (address + nbytes) // huge_pages.HUGE_PAGE * huge_pages.HUGE_PAGE
    assert by_start[first] == last - first  # every whole page, and nothing outside the buffer
  assert len(calls) == 2  # the small array has no whole page: not advised
  assert report["eligible"] == report["backed"] == sum(by_start.values())


def test_a_refusing_kernel_counts_nothing_as_backed_and_raises_nothing(monkeypatch):
  _fake_madvise(monkeypatch, result=-1)
  x = jnp.zeros((4 * MIB // 4,), jnp.float32) + 2
  report = huge_pages.back([x])
  assert report["eligible"] >= huge_pages.HUGE_PAGE and report["backed"] == 0
  np.testing.assert_array_equal(np.asarray(x), 2)


def test_turned_off_by_the_environment(monkeypatch):
  monkeypatch.setenv("TOPK_HUGE_PAGES", "0")
  x = jnp.zeros((4 * MIB // 4,), jnp.float32) + 2
  report = huge_pages.back(x)
  assert report["backed"] == 0 and report["eligible"] >= huge_pages.HUGE_PAGE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_the_kernel_moves_the_buffer_onto_huge_pages_and_the_values_are_unchanged():
  madvise, why = huge_pages._madvise()  # pylint: disable=protected-access
  if madvise is None:
    pytest.skip(f"no transparent huge pages here: {why}")
  rng = np.random.default_rng(0)
  values = rng.standard_normal((2048, 1024), dtype=np.float32)  # 8 MiB
  x = jnp.asarray(values) * 1.0  # XLA's own buffer (malloc: 4 KiB pages unless THP is "always")
  product = np.asarray(x @ jnp.ones((1024,)))
  report = huge_pages.back(x)
  if report["backed"] == 0:
    pytest.skip("the kernel refused MADV_COLLAPSE (memory too fragmented, or a kernel before 6.1)")
  assert report["backed"] == report["eligible"] >= 3 * huge_pages.HUGE_PAGE
  assert _anon_huge_kib(x.unsafe_buffer_pointer()) >= report["backed"] // 1024  # the mapping holds them
  np.testing.assert_array_equal(np.asarray(x), values)
  np.testing.assert_array_equal(np.asarray(x @ jnp.ones((1024,))), product)
