"""What a benchmark records about the machine it ran on."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Dict

import jax


def cpu_name() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average():
  """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
  return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> Dict[str, Any]:
  """Backend, device kind and count, CPU, cores, versions, date and the load average at the start."""
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
          "cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
          "date": datetime.datetime.now().isoformat(timespec="seconds"), "load_average_at_start": load_average()}
