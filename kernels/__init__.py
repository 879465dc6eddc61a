"""Pallas kernels (installed as `longctx.kernels`).

Each kernel module exposes one public function with a pure-JAX reference beside
it and an `impl` switch ("reference", "xla", "pallas"); see docs/contracts.md §3.
  linear_recurrence  o_t = q_t S_t, S_t = a_t S_{t-1} + k_t^T v_t (and the delta rule),
                     chunked, with a sequence-parallel form for `jax.shard_map`.
  ring_attention     causal / sliding-window attention over packed documents: single-device
                     flash attention, and ring attention across a mesh axis in `jax.shard_map`
                     (zig-zag / striped load balancing, exact lse merges, custom backward).
"""
