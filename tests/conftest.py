"""Shared test setup: 8 virtual CPU devices (set before jax is imported) and helpers."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests run on the 8 virtual CPU devices, also where an accelerator or libtpu (the test extra's TPU compiler,
# used compile-only) is present: without this, jax would try to start a TPU backend and print libtpu's warnings
# into every subprocess's stderr. JAX_PLATFORMS=... set by the caller wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock file when a process first uses it, so under `pytest -n 2` the second worker's
# compile-only TPU tests would fail ("Internal error when accessing libtpu multi-process lockfile"). Here libtpu
# only compiles (no TPU is opened), so concurrent loads are safe.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def rel_err(a, b) -> float:
  """‖a − b‖ / ‖b‖ in float64; NaN anywhere gives inf (NaN never passes)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    return float("inf")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="session")
def eight_devices():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py must set 8 host devices before jax is imported"
  return devices


# ----------------------------------------------------------------------------- the hostile-input count
# Counted from the test reports (the controller sees every xdist worker's), printed in the closing summary.
_HOSTILE_CASES: list[bool] = []


def pytest_runtest_logreport(report):
  if report.when == "call" and "test_hostile_inputs.py::test_hostile_input[" in report.nodeid:
    _HOSTILE_CASES.append(report.passed)


def pytest_terminal_summary(terminalreporter):
  if _HOSTILE_CASES:
    tried, clear = len(_HOSTILE_CASES), sum(_HOSTILE_CASES)
    terminalreporter.write_line(f"hostile inputs: {tried} tried, {clear} clear one-line errors with no traceback and "
                                f"nothing written, {tried - clear} failed (tests/test_hostile_inputs.py)")
