"""`longctx.kernels` is the top-level kernels/ folder (through the link longctx/kernels -> ../kernels), and that
folder never shadows the PyPI distribution named `kernels` (kernels/README.md).

(Regression: with kernels/__init__.py, `python -m pytest` from the repository root put our folder first on
sys.path, transformers >= 5.25 imported it instead of Hugging Face's `kernels` and every Hugging Face interop
test failed with "cannot import name 'CUDAProperties' from 'kernels'".)"""

import importlib.metadata
import pathlib
import subprocess
import sys

from longctx.kernels import linear_recurrence, ring_attention

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_longctx_kernels_is_the_top_level_folder():
  for module in (linear_recurrence, ring_attention):
    assert pathlib.Path(module.__file__).resolve().parent == ROOT / "kernels"
  assert (ROOT / "longctx" / "kernels").is_symlink()
  assert not (ROOT / "kernels" / "__init__.py").exists(), "a kernels/__init__.py makes the folder shadow PyPI's kernels"


def test_the_folder_does_not_shadow_an_installed_kernels_distribution():
  """From the repository root (sys.path[0]), `import kernels` is the installed distribution if there is one, and
  at most an empty namespace (no __file__) otherwise: never a package of ours."""
  code = "import kernels, sys; sys.stdout.write(str(getattr(kernels, '__file__', None)))"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  try:
    importlib.metadata.version("kernels")
    installed = True
  except importlib.metadata.PackageNotFoundError:
    installed = False
  if installed:
    assert out != "None" and not pathlib.Path(out).resolve().is_relative_to(ROOT / "kernels"), out
  else:
    assert out == "None", out
