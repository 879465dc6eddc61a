"""Pallas kernels (installed as `longctx.kernels`).

Each kernel module exposes one public function with a pure-JAX reference beside
it and an `impl` switch ("reference", "xla", "pallas"); see CONVENTIONS.md §3.
The chunked linear recurrence and ring attention land with their issues.
"""
