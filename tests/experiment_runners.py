"""The experiments' runners (``experiments/<name>/run.py``, scripts rather than a package) as modules, one copy
per process whichever test file loads them."""

from __future__ import annotations

import importlib.util
import os
import sys

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def load(name: str):
  """``experiments/<name>/run.py`` as the module ``experiment_<name>_run``."""
  module_name = f"experiment_{name}_run"
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(EXPERIMENTS, name, "run.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
  return sys.modules[module_name]
