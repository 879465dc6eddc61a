"""Gated DeltaNet / DeltaNet: the layer's recurrence against a float64 token loop (documents, carried state,
grouped value heads, gradients of the chunked form against the token scan), against Hugging Face's Qwen3-Next
gated-delta-rule torch functions on the same inputs, and the whole mixer against `Qwen3NextGatedDeltaNet` with
the same weights. The streaming contract (any cut, reset, no leak, sharded) is tests/test_contract.py's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from longctx.errors import ConfigError
from longctx.layers.context import Context
from longctx.models import GatedDeltaNetConfig, create_model
from longctx.models.gated_deltanet import GatedDeltaMixer, gated_delta_rule

B, S, HK, HV, DK, DV = 2, 24, 2, 4, 8, 6


def random_inputs(seed, *, docs=True):
  rng = np.random.default_rng(seed)
  f = lambda *shape, scale=1.0: scale * rng.standard_normal(shape)
  seg = np.zeros((B, S), np.int32)
  if docs:
    seg[0, 9:] = 1
    seg[0, 17:] = 2
    seg[1, 5:] = 1
  return dict(q=f(B, S, HK, DK), k=f(B, S, HK, DK), v=f(B, S, HV, DV), a=f(B, S, HV), b=f(B, S, HV),
              a_log=np.log(rng.uniform(0.5, 4.0, HV)), dt_bias=f(HV, scale=0.5), segment_ids=seg,
              initial_state=f(B, HV, DK, DV, scale=0.3))


def token_loop(inp, *, gated):
  """float64, one token at a time: l2-normalise, scale q, repeat q/k over the value heads' groups, decay,
  the delta write, the read; a new document restarts from zero."""
  q, k, v = inp["q"], inp["k"], inp["v"]
  unit = lambda x: x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)
  q = np.repeat(unit(q), HV // HK, axis=2) / np.sqrt(DK)
  k = np.repeat(unit(k), HV // HK, axis=2)
  beta = 1 / (1 + np.exp(-inp["b"]))
  softplus = lambda x: np.log1p(np.exp(x))
  decay = np.exp(-np.exp(inp["a_log"]) * softplus(inp["a"] + inp["dt_bias"])) if gated else np.ones((B, S, HV))
  out = np.zeros((B, S, HV, DV))
  final = np.zeros((B, HV, DK, DV))
  for r in range(B):
    st = inp["initial_state"][r].copy()
    for t in range(S):
      if t > 0 and inp["segment_ids"][r, t] != inp["segment_ids"][r, t - 1]:
        st = np.zeros_like(st)
      for h in range(HV):
        s = decay[r, t, h] * st[h]
        kt = k[r, t, h]
        s = s + beta[r, t, h] * np.outer(kt, v[r, t, h] - kt @ s)
        st[h] = s
        out[r, t, h] = q[r, t, h] @ s
    final[r] = st
  return out, final


def ours(inp, *, gated, kernel, chunk_size=8):
  j = {n: jnp.asarray(x, jnp.int32 if n == "segment_ids" else jnp.float32) for n, x in inp.items()}
  return gated_delta_rule(j["q"], j["k"], j["v"], j["a"], j["b"], a_log=j["a_log"] if gated else None,
                          dt_bias=j["dt_bias"], segment_ids=j["segment_ids"], initial_state=j["initial_state"],
                          kernel=kernel, chunk_size=chunk_size)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "delta"])
@pytest.mark.parametrize("kernel", ["reference", "xla"])
def test_recurrence_equals_the_float64_token_loop(gated, kernel):
  inp = random_inputs(0)
  out, final = ours(inp, gated=gated, kernel=kernel)
  out_ref, final_ref = token_loop(inp, gated=gated)
  assert rel_err(out, out_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "delta"])
def test_chunked_gradients_equal_the_token_scan(gated):
  """Gradients w.r.t. every input (projections, gate logits, A_log, dt_bias, initial state) of the chunked
  form (documents starting inside chunks, a chunk not dividing the sequence) equal the token scan's."""
  inp = {n: (x if n == "segment_ids" else jnp.asarray(x, jnp.float32)) for n, x in random_inputs(1).items()}
  rng = np.random.default_rng(2)
  cot_o, cot_s = rng.standard_normal((B, S, HV, DV)), rng.standard_normal((B, HV, DK, DV))

  def loss(x, kernel):
    out, final = ours({**inp, **x}, gated=gated, kernel=kernel, chunk_size=5)
    return jnp.sum(out * cot_o) + jnp.sum(final * cot_s)

  x = {n: inp[n] for n in ("q", "k", "v", "a", "b", "a_log", "dt_bias", "initial_state")}
  g = jax.grad(loss)(x, "xla")
  g_ref = jax.grad(loss)(x, "reference")
  for n in x:
    if not gated and n in ("a", "a_log", "dt_bias"):
      continue  # no decay: nothing reads them
    assert float(jnp.linalg.norm(g_ref[n])) > 0, n
    assert rel_err(g[n], g_ref[n]) < 1e-4, n


# ----------------------------------------------------------------------------- Hugging Face Qwen3-Next


def _qwen3_next():
  return pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next",
                             reason="the installed transformers has no Qwen3-Next (its gated delta rule)")


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_equals_hugging_face_gated_delta_rule_functions(form):
  """Hugging Face's torch reference functions (`torch_recurrent_gated_delta_rule`, `torch_chunk_gated_delta_rule`,
  q/k L2-normalised inside) on the same inputs: one document, the same initial state, grouped value heads."""
  import torch

  hf = _qwen3_next()
  inp = random_inputs(3, docs=False)
  out, final = ours(inp, gated=True, kernel="xla")
  softplus = lambda x: np.log1p(np.exp(x))
  g = -np.exp(inp["a_log"]) * softplus(inp["a"] + inp["dt_bias"])
  t = lambda x: torch.tensor(np.asarray(x, np.float32))
  fn = hf.torch_recurrent_gated_delta_rule if form == "recurrent" else hf.torch_chunk_gated_delta_rule
  kw = {} if form == "recurrent" else {"chunk_size": 8}
  o_hf, s_hf = fn(t(inp["q"]), t(inp["k"]), t(inp["v"]), g=t(g), beta=t(1 / (1 + np.exp(-inp["b"]))),
                  initial_state=t(inp["initial_state"]), output_final_state=True, use_qk_l2norm_in_kernel=True, **kw)
  assert rel_err(out, o_hf.numpy()) < 1e-5 and rel_err(final, s_hf.numpy()) < 1e-5


def to_hf_layer(mixer: GatedDeltaMixer) -> dict:
  """Our mixer's weights as a `Qwen3NextGatedDeltaNet` state dict (its in_proj_qkvz / in_proj_ba interleave q,
  k, v, z and b, a per key head; conv1d's channels are q | k | v flattened)."""
  cfg = mixer.cfg
  d, hk, r = cfg.d_model, cfg.num_heads, cfg.resolved_value_heads // cfg.num_heads
  w = lambda p: np.asarray(p[...], np.float32)
  per_head = lambda p: w(p).reshape(d, hk, -1)  # [d, hk, r * dv] (value heads g * r + j) or [d, hk, dk]
  qkvz = np.concatenate([per_head(mixer.wq), per_head(mixer.wk), per_head(mixer.wv), per_head(mixer.wz)], axis=2)
  ba = np.concatenate([w(mixer.wb).reshape(d, hk, r), w(mixer.wa).reshape(d, hk, r)], axis=2)
  conv = np.concatenate([w(c).reshape(cfg.conv_kernel, -1) for c in (mixer.conv_q, mixer.conv_k, mixer.conv_v)], 1)
  hv, dv = cfg.resolved_value_heads, cfg.resolved_value_dim
  return {"in_proj_qkvz.weight": qkvz.reshape(d, -1).T, "in_proj_ba.weight": ba.reshape(d, -1).T,
          "conv1d.weight": conv.T[:, None, :], "dt_bias": w(mixer.dt_bias), "A_log": w(mixer.A_log),
          "norm.weight": w(mixer.norm), "out_proj.weight": w(mixer.wo).reshape(hv * dv, d).T}


def test_mixer_equals_hugging_face_qwen3_next_layer():
  """The whole mixer (projections, convs, gates, the recurrence, gated RMSNorm, output) against
  `Qwen3NextGatedDeltaNet` with the same weights, one 24-token sequence, then our two segments of 11 + 13
  tokens carrying the conv histories and the state."""
  import torch

  hf = _qwen3_next()
  from transformers import Qwen3NextConfig

  cfg = GatedDeltaNetConfig(vocab_size=50, d_model=32, num_layers=1, num_heads=HK, head_dim=DK,
                            num_value_heads=HV, value_head_dim=DV, chunk_size=8, kernel="xla")
  cfg.validate()
  mixer = create_model(cfg, seed=0).blocks[0].mixer
  hf_cfg = Qwen3NextConfig(hidden_size=32, linear_num_key_heads=HK, linear_num_value_heads=HV,
                           linear_key_head_dim=DK, linear_value_head_dim=DV, linear_conv_kernel_dim=cfg.conv_kernel,
                           hidden_act="silu", rms_norm_eps=cfg.norm_eps, num_hidden_layers=1,
                           layer_types=["linear_attention"])
  layer = hf.Qwen3NextGatedDeltaNet(hf_cfg, layer_idx=0)
  layer.load_state_dict({n: torch.tensor(np.ascontiguousarray(x)) for n, x in to_hf_layer(mixer).items()})
  x = np.random.default_rng(4).standard_normal((B, S, 32)).astype(np.float32)
  with torch.no_grad():
    want = layer(torch.tensor(x)).numpy()

  def run(xs, state, start):
    ctx = Context.of(jnp.zeros((B, xs.shape[1]), jnp.int32), jnp.full((B,), start, jnp.int32))
    return mixer(jnp.asarray(xs), state, ctx)

  got, _ = run(x, mixer.init_state(B), 0)
  assert rel_err(got, want) < 1e-5
  first, state = run(x[:, :11], mixer.init_state(B), 0)
  second, _ = run(x[:, 11:], state, 11)
  assert rel_err(jnp.concatenate([first, second], axis=1), want) < 1e-5


@pytest.mark.parametrize("change,match", [
    (dict(variant="gla"), "variant"), (dict(num_value_heads=3), "multiple"), (dict(conv_kernel=0), "conv_kernel"),
    (dict(chunk_size=0), "chunk_size"), (dict(dt_min=0.0), "dt_min"), (dict(value_head_dim=-1), "value_head_dim"),
])
def test_config_errors(change, match):
  cfg = GatedDeltaNetConfig(vocab_size=50, d_model=32, num_layers=1, num_heads=2)
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(cfg, **change).validate()
