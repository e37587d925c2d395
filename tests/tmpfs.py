"""A real small or read-only filesystem for the tests of a full disk and of a read-only MODEL_DIR.

``mount -t tmpfs`` needs root (or CAP_SYS_ADMIN); where it is refused, the test that asked is skipped and says so.
"""

import contextlib
import subprocess

import pytest


@contextlib.contextmanager
def mounted(directory, options):
  """A tmpfs mounted on ``directory`` (made if missing) with ``options`` (e.g. ``'ro,size=1m'``), unmounted after."""
  directory.mkdir(parents=True, exist_ok=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True,
                        text=True, check=False)
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
  try:
    yield directory
  finally:
    subprocess.run(["umount", "-l", str(directory)], check=False)
