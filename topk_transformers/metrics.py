"""Training metrics: TensorBoard event files (clu metric_writers) and a console progress line."""

from __future__ import annotations

import time
from typing import Dict, Mapping

import jax
from clu import metric_writers


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _summarise_sparsity(metrics: Mapping[str, float], prefix: str = "sparsity/") -> str:
  by_stack: Dict[str, list] = {}
  for k, v in metrics.items():
    if k.startswith(prefix):
      stack = k[len(prefix):].split("/")[0]
      by_stack.setdefault(stack, []).append(v)
  order = {"encoder": 0, "decoder": 1}
  stacks = sorted(by_stack, key=lambda s: (order.get(s, 2), s))
  return " ".join(f"{s} {sum(by_stack[s]) / len(by_stack[s]):.1f}%" for s in stacks)


class MetricLogger:
  """Writes ``train/*`` and ``eval/*`` scalars and prints one progress line per log step.

  Only process 0 writes event files and prints; the others stay quiet.
  """

  def __init__(self, model_dir: str, total_steps: int, start_step: int = 0):
    self.writer = metric_writers.create_default_writer(
        model_dir, just_logging=jax.process_index() > 0, asynchronous=False)
    self.total_steps = total_steps
    self._t0 = time.time()
    self._last_time = self._t0
    self._last_step = start_step
    self._start_step = start_step
    self._first_log = True

  def log_train(self, step: int, metrics: Mapping[str, float]) -> Dict[str, float]:
    now = time.time()
    dt = max(now - self._last_time, 1e-9)
    steps = step - self._last_step
    out = dict(metrics)
    tokens = out.pop("num_tokens", None)
    input_tokens = out.pop("num_input_tokens", 0.0)
    if tokens is not None:
      out["tokens_per_second"] = (tokens + input_tokens) * steps / dt
    out["steps_per_second"] = steps / dt
    self.writer.write_scalars(step, {f"train/{k}": v for k, v in out.items()})
    self.writer.flush()
    if self._first_log:
      # The first logged step includes compilation: time the ETA from here on.
      self._first_log = False
      self._t0, self._start_step = now, step
      eta = None
    else:
      rate = (step - self._start_step) / max(now - self._t0, 1e-9)
      eta = (self.total_steps - step) / max(rate, 1e-9)
    parts = [f"step {step}/{self.total_steps}", f"loss {out.get('loss', float('nan')):.4f}"]
    if "accuracy" in out:
      parts.append(f"acc {out['accuracy']:.3f}")
    if "z_loss" in out:
      parts.append(f"z {out['z_loss']:.2e}")
    if "learning_rate" in out:
      parts.append(f"lr {out['learning_rate']:.2e}")
    if "tokens_per_second" in out:
      parts.append(f"{out['tokens_per_second']:,.0f} tok/s")
    else:
      parts.append(f"{out['steps_per_second']:.2f} step/s")
    sp = _summarise_sparsity(out)
    if sp:
      parts.append(f"nonzero {sp}")
    parts.append(f"ETA {_fmt_duration(eta)}" if eta is not None else "ETA (compiling)")
    if jax.process_index() == 0:
      print(" | ".join(parts), flush=True)
    self._last_time, self._last_step = now, step
    return out

  def log_eval(self, step: int, metrics: Mapping[str, float], sparsity: Mapping[str, float]) -> None:
    scalars = {f"eval/{k}": v for k, v in metrics.items()}
    scalars.update({f"eval/sparsity/{k}": v for k, v in sparsity.items()})
    self.writer.write_scalars(step, scalars)
    self.writer.flush()
    line = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    sp = _summarise_sparsity({f"s/{k}": v for k, v in sparsity.items()}, prefix="s/")
    if jax.process_index() == 0:
      print(f"eval @ step {step}: {line}" + (f" | nonzero {sp}" if sp else ""), flush=True)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def read_scalars(model_dir: str, tag: str) -> Dict[int, float]:
  """``{step: value}`` of one scalar (e.g. ``'train/loss'``) from the event files the run wrote, at full precision."""
  import os  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # the event files' reader

  values = {}
  for root, _, files in os.walk(model_dir):
    for name in sorted(files):
      if name.startswith("events.out"):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
          for value in event.summary.value:
            if value.tag == tag:
              values[event.step] = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                                    else value.simple_value)
  return values
