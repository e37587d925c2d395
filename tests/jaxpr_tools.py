"""Reading what a traced program does: its equations, sub-programs (jit, cond, loops) included."""

from __future__ import annotations

from typing import Iterator

import jax


def equations(fn, *args) -> Iterator[jax.core.JaxprEqn]:
  """Every equation of ``fn``'s jaxpr on ``args``, depth first, those of nested jaxprs included."""

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for sub in jax.core.jaxprs_in_params(eqn.params):
        yield from walk(sub)

  yield from walk(jax.make_jaxpr(fn)(*args).jaxpr)


def recall_targets(fn, *args) -> list:
  """The ``recall_target`` of every ``approx_top_k`` in ``fn``'s program, in order."""
  return [e.params["recall_target"] for e in equations(fn, *args) if e.primitive.name == "approx_top_k"]
