#!/usr/bin/env python
"""Benchmark the train step: same as `longctx bench` (see `longctx bench --help`)."""

import sys

from longctx.cli import main

if __name__ == "__main__":
  sys.exit(main(["bench", *sys.argv[1:]]))
