"""Autotune (``autotune.py``): choices measured with a fake timer, the cache on disk, the off switch."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import autotune
from topk_transformers import layers
from topk_transformers import mlp_steps
from topk_transformers import row_kernels
from topk_transformers import topk


class FakeTimer:
  """Says each candidate takes ``seconds[name]`` (1 s if not named: a tie keeps the rule); records what it was
  asked; runs each call once if ``run`` (a call may trace code that asks for a choice of its own)."""

  def __init__(self, seconds, run=False):
    self.seconds, self.run, self.asked = dict(seconds), run, []

  def __call__(self, calls):
    self.asked.append(sorted(calls))
    if self.run:
      for call in calls.values():
        jax.block_until_ready(call())
    return {name: self.seconds.get(name, 1.0) for name in calls}


def refuse(calls):
  raise AssertionError(f"nothing should be measured here, asked {sorted(calls)}")


@pytest.fixture(name="cache")
def _cache(tmp_path, monkeypatch):
  """Autotune on, with a fresh cache file; what the process remembers is dropped before and after."""
  path = tmp_path / "autotune.json"
  monkeypatch.setenv(autotune.ENV_SWITCH, "1")
  monkeypatch.setenv(autotune.ENV_CACHE, str(path))
  autotune.forget()
  yield path
  autotune.forget()


@pytest.mark.parametrize("fastest", ["exact", "threshold"])
def test_auto_takes_the_selection_method_the_timer_finds_fastest(cache, fastest):
  slow = {"exact": "threshold", "threshold": "exact"}[fastest]
  timer = FakeTimer({fastest: 1e-3, slow: 2e-3}, run=True)  # run: the candidates' calls must work
  with autotune.use_timer(timer):
    for shape in [(2, 64), (16, 2048)]:  # the CPU rule says exact for the first, threshold for the second
      assert topk.resolve_method("auto", shape, 8, jnp.float32) == fastest
  assert timer.asked == [["exact", "threshold"]] * 2
  assert topk.resolve_method("exact", (2, 64), 8, jnp.float32) == "exact"  # an explicit method is never tuned
  assert topk.resolve_method("auto", (2, 64), 8, jnp.int32) == "exact"  # the only exact method for integers
  assert topk.resolve_method("auto", (2, 64), 8, jnp.float32, "tpu") == "threshold"  # another backend: its rule


def test_a_near_tie_keeps_the_rule_and_each_shape_is_measured_once(cache):
  timer = FakeTimer({"exact": 1e-3, "threshold": 0.97e-3})  # within autotune.MARGIN (5%): noise on a shared machine
  with autotune.use_timer(timer):
    assert topk.resolve_method("auto", (2, 64), 8, jnp.float32) == "exact"  # the CPU rule for few rows
    assert topk.resolve_method("auto", (16, 2048), 8, jnp.float32) == "threshold"
    assert topk.resolve_method("auto", (16, 2048), 8, jnp.float32) == "threshold"
    assert topk.resolve_method("auto", (4, 4, 2048), 8, jnp.float32) == "threshold"  # the same 16 tokens
    assert topk.resolve_method("auto", (16, 2048), 8, jnp.bfloat16) == "threshold"  # another dtype: measured
  assert len(timer.asked) == 3


def test_the_cache_is_written_and_read_back_by_a_fresh_process(cache):
  with autotune.use_timer(FakeTimer({"exact": 5e-3, "threshold": 1e-3})):
    assert topk.resolve_method("auto", (2, 64), 8, jnp.float32) == "threshold"  # the rule would say exact
  data = json.loads(cache.read_text())
  (key, entry), = data["entries"].items()
  assert key.startswith("selection|cpu|") and "dtype=float32" in key and "tokens=2" in key and "k=8" in key
  assert entry["choice"] == "threshold" and entry["rule"] == "exact" and entry["seconds"]["exact"] == 5e-3
  assert not [p for p in os.listdir(cache.parent) if p != cache.name]  # the temporary file was renamed

  autotune.forget()  # this process forgets; the file remembers
  with autotune.use_timer(refuse):
    assert topk.resolve_method("auto", (2, 64), 8, jnp.float32) == "threshold"

  script = ("import jax.numpy as jnp\nfrom topk_transformers import autotune, topk\n"
            "autotune._timer = lambda calls: 1 / 0  # measuring would fail\n"
            "print(topk.resolve_method('auto', (2, 64), 8, jnp.float32))\n")
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False,
                        env={**os.environ, autotune.ENV_SWITCH: "1", autotune.ENV_CACHE: str(cache)})
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["threshold"]


def test_a_new_entry_keeps_what_another_process_wrote(cache):
  with autotune.use_timer(FakeTimer({"exact": 1e-3, "threshold": 2e-3})):
    topk.resolve_method("auto", (2, 64), 8, jnp.float32)
    data = json.loads(cache.read_text())
    data["entries"]["selection|elsewhere"] = {"choice": "threshold"}
    cache.write_text(json.dumps(data))
    topk.resolve_method("auto", (3, 64), 8, jnp.float32)
  assert len(json.loads(cache.read_text())["entries"]) == 3


def _ties(shape, seed=0):
  # ReLU of coarsely rounded values: many zeros and equal values, so the k-th place is often tied.
  x = np.round(np.random.default_rng(seed).standard_normal(shape) * 2) / 2
  x[0, :5] = -0.0
  return jnp.asarray(np.maximum(x, 0.0), jnp.float32)


def test_results_are_bit_identical_whichever_method_is_chosen(cache, tmp_path, monkeypatch):
  x, ct = _ties((12, 256)), _ties((12, 256), seed=1)

  def run():  # a fresh function each time, so that it is traced (and the method resolved) again
    def loss(x):
      return jnp.vdot(topk.topk(x, 20), ct)
    return jax.jit(lambda x: (topk.topk(x, 20), jax.grad(loss)(x)))(x)

  outputs = {}
  for fastest, slow in [("exact", "threshold"), ("threshold", "exact")]:
    monkeypatch.setenv(autotune.ENV_CACHE, str(tmp_path / f"{fastest}.json"))
    autotune.forget()
    timer = FakeTimer({fastest: 1e-3, slow: 2e-3})
    with autotune.use_timer(timer):
      outputs[fastest] = jax.device_get(run())
    assert timer.asked  # each run measured, and took its own method
  assert json.loads((tmp_path / "threshold.json").read_text())["entries"].popitem()[1]["choice"] == "threshold"
  for a, b in zip(outputs["exact"], outputs["threshold"]):
    assert a.tobytes() == b.tobytes()
  assert np.all(np.sum(outputs["exact"][0] != 0, axis=-1) <= 20)


def test_off_switch_takes_the_rules_and_measures_nothing(cache, monkeypatch):
  monkeypatch.setenv(autotune.ENV_SWITCH, "0")
  assert not autotune.enabled()
  with autotune.use_timer(refuse):
    assert topk.resolve_method("auto", (2, 64), 8, jnp.float32) == "exact"
    assert topk.resolve_method("auto", (16, 2048), 8, jnp.float32) == "threshold"
    v, w, idx = jnp.ones((1, 4)), jnp.ones((32, 8)), jnp.zeros((1, 4), jnp.int32)
    expected = "ffi" if row_kernels.available() else "xla"
    assert row_kernels.implementation("gather_vecmat", v, w, idx) == expected
  assert not cache.exists()
  for value in ("false", "off", "no", "0"):
    monkeypatch.setenv(autotune.ENV_SWITCH, value)
    assert not autotune.enabled()
  monkeypatch.delenv(autotune.ENV_SWITCH)
  assert autotune.enabled()  # on by default


def test_a_corrupt_cache_is_one_warning_and_is_replaced(cache, caplog):
  cache.write_text('{"entries": {"selection|cpu')  # a write cut short
  with caplog.at_level(logging.WARNING, logger=autotune.__name__), autotune.use_timer(
      FakeTimer({"exact": 2e-3, "threshold": 1e-3})):
    assert topk.resolve_method("auto", (2, 64), 8, jnp.float32) == "threshold"
    assert topk.resolve_method("auto", (3, 64), 8, jnp.float32) == "threshold"
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and str(cache) in warnings[0] and "\n" not in warnings[0]
  assert len(json.loads(cache.read_text())["entries"]) == 2  # rewritten whole


@pytest.mark.parametrize("content", ["[1, 2]", '{"entries": []}', "\xff\xfe not utf-8"])
def test_a_cache_of_another_shape_is_ignored(cache, content):
  cache.write_bytes(content.encode("latin-1"))
  with autotune.use_timer(FakeTimer({"exact": 1e-3, "threshold": 2e-3})):
    assert topk.resolve_method("auto", (16, 2048), 8, jnp.float32) == "exact"


def test_an_unwritable_cache_is_a_warning_and_choices_stay_in_memory(cache, caplog):
  cache.mkdir()  # a directory where the file should be: neither read nor written
  timer = FakeTimer({"exact": 2e-3, "threshold": 1e-3})
  with caplog.at_level(logging.WARNING, logger=autotune.__name__), autotune.use_timer(timer):
    assert topk.resolve_method("auto", (2, 64), 8, jnp.float32) == "threshold"
    assert topk.resolve_method("auto", (2, 64), 8, jnp.float32) == "threshold"
  assert len(timer.asked) == 1
  assert 1 <= len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 2


def _block(**kw):
  return layers.MlpBlock(**{"intermediate_dim": 256, "activations": ("relu",), "intermediate_dropout_rate": 0.0,
                            "top_k": 16, **kw})


@pytest.mark.parametrize("fastest", ["dense", "sparse"])
def test_the_decoding_path_is_the_one_the_timer_finds_fastest(cache, fastest):
  block = _block()
  x = jnp.ones((1, 1, 32))
  params = block.init(jax.random.PRNGKey(0), x)
  slow = {"dense": "sparse", "sparse": "dense"}[fastest]
  timer = FakeTimer({fastest: 1e-3, slow: 2e-3}, run=True)
  with autotune.use_timer(timer):
    assert block.bind(params)._path(x, True, True) == fastest  # the rule (4 * 1 * 16 <= 256) says sparse
    dropout = layers.MlpBlock(intermediate_dim=256, intermediate_dropout_rate=0.1, top_k=16)
    assert dropout.bind(params)._path(x, True, False) == "dense"  # dropout active: nothing to choose
    assert _block(sparse_decode=True).bind(params)._path(x, True, True) == "sparse"  # forced: not measured
  assert timer.asked[0] == ["dense", "sparse"]
  key, = [k for k in json.loads(cache.read_text())["entries"] if k.startswith("decode_path")]
  assert "tokens=1" in key and "d_ff=256" in key and "activations=relu" in key


def test_the_decoding_step_gives_the_same_output_on_either_path(cache, monkeypatch):
  block = _block()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 32))
  params = block.init(jax.random.PRNGKey(0), x)
  outputs = {}
  for fastest, slow in [("dense", "sparse"), ("sparse", "dense")]:
    autotune.forget()
    monkeypatch.setenv(autotune.ENV_CACHE, str(cache.parent / f"{fastest}.json"))
    with autotune.use_timer(FakeTimer({fastest: 1e-3, slow: 2e-3})):
      outputs[fastest] = jax.jit(lambda p, x: block.apply(p, x, decode=True, deterministic=True))(params, x)
  np.testing.assert_allclose(outputs["dense"], outputs["sparse"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fastest", ["ffi", "xla"])
def test_the_row_implementation_is_the_one_the_timer_finds_fastest(cache, fastest):
  if not row_kernels.available():
    pytest.skip(f"no CPU row kernels: {row_kernels.unavailable_reason()}")
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
  v, x = jnp.asarray(rng.standard_normal((2, 8)), jnp.float32), jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
  slow = {"ffi": "xla", "xla": "ffi"}[fastest]
  timer = FakeTimer({fastest: 1e-3, slow: 2e-3}, run=True)
  with autotune.use_timer(timer):
    assert row_kernels.implementation("gather_vecmat", v, w, idx) == fastest
    assert row_kernels.implementation("gather_matvec", x, w, idx) == fastest
    got = (jax.jit(row_kernels.gather_vecmat)(v, w, idx), jax.jit(row_kernels.gather_matvec)(x, w, idx))
    # No Pallas candidate on the CPU; bfloat16 has XLA's gather alone, so nothing is measured for it.
    assert row_kernels.implementation("gather_vecmat", v.astype(jnp.bfloat16), w.astype(jnp.bfloat16), idx) == "xla"
  assert timer.asked == [["ffi", "xla"], ["ffi", "xla"]]
  np.testing.assert_allclose(got[0], jnp.einsum("bk,bkd->bd", v, w[idx]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], jnp.einsum("bd,bcd->bc", x, w[idx]), rtol=1e-5, atol=1e-5)
  assert row_kernels.implementation("gather_vecmat", v, w, idx, native=False) == "xla"


def test_the_decoding_steps_read_bfloat16_rows_as_before(cache):
  # mlp_steps sends a bfloat16 wo through row_kernels (so that Pallas can compete on GPU and TPU); on CPU that is
  # XLA's gather, the same product as topk.sparse_matmul.
  rng = np.random.default_rng(0)
  wo = jnp.asarray(rng.standard_normal((64, 16)), jnp.bfloat16)
  vals = jnp.asarray(rng.standard_normal((2, 8)), jnp.bfloat16)
  idx = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
  settings = mlp_steps.Settings(top_k=8, dtype=jnp.bfloat16)
  with autotune.use_timer(refuse):
    got = mlp_steps._rows_of_wo(vals, idx, {"kernel": wo}, settings)
  assert got.tobytes() == topk.sparse_matmul(vals, idx, wo, dtype=jnp.bfloat16).tobytes()


def test_choose_checks_its_default_and_skips_a_lone_candidate(cache):
  with pytest.raises(ValueError, match="not among"):
    autotune.choose("x", {"n": 1}, {"a": lambda: None}, "b")
  with autotune.use_timer(refuse):
    assert autotune.choose("x", {"n": 1}, {"a": lambda: None}, "a") == "a"


def test_a_candidate_that_fails_on_the_device_is_left_out(cache, caplog):
  # A kernel the device's compiler rejects must cost a warning, not the user's step.
  def broken_build():
    raise RuntimeError("does not lower here")

  def broken_call():
    raise RuntimeError("rejected by the compiler")

  ones = jnp.ones((4,))
  with caplog.at_level(logging.WARNING, logger=autotune.__name__):
    with autotune.use_timer(FakeTimer({"a": 2e-3, "c": 1e-3})):
      assert autotune.choose("x", {"n": 1}, {"a": lambda: (lambda: ones), "b": broken_build,
                                             "c": lambda: (lambda: ones)}, "b") == "c"
    # The real timer: a call that fails takes no time slot and is not chosen, even as the rule's choice.
    assert autotune.choose("y", {"n": 1}, {"a": lambda: (lambda: ones + 1), "b": lambda: broken_call}, "b") == "a"
    # Nothing that runs: the rule's choice stands; one that runs: that one, whatever the rule says.
    assert autotune.choose("z", {"n": 1}, {"a": broken_build, "b": broken_build}, "b") == "b"
    assert autotune.choose("w", {"n": 1}, {"a": lambda: (lambda: ones * 2), "b": broken_build}, "b") == "a"
  entries = json.loads(cache.read_text())["entries"]
  assert entries[[k for k in entries if k.startswith("y|")][0]]["seconds"]["b"] is None
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "does not lower here" in messages and "rejected by the compiler" in messages
