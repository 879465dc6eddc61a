"""matplotlib's pyplot on the file-only Agg backend: every plot longctx draws is a PNG, on any machine."""

from __future__ import annotations


def pyplot():
  """`matplotlib.pyplot`, imported on first use (plots are optional work; import cost stays off the CLI)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
