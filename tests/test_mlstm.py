"""mLSTM: the unstabilised chunked cell against the paper's stabilised token loop in float64 (documents, a
carried state, large input gates), the chunked gradients against the token scan, and the whole layer against
Hugging Face's `xLSTMLayer` (transformers' xLSTM 7B) with the same weights, one pass and two segments carrying
the state. The streaming contract (any cut, reset, no leak, sharded) is tests/test_contract.py's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from longctx.errors import ConfigError
from longctx.layers.context import Context
from longctx.models import MLSTMConfig, create_model
from longctx.layers import soft_cap
from longctx.models.mlstm import mlstm_cell

B, S, H, DK, DV = 2, 23, 2, 8, 6
EPS = 1e-6


def stabilised_loop(q, k, v, i_pre, f_pre, seg, c0, n0, m0):
  """float64, token by token, the paper's stabilised recurrence (as transformers' mlstm_recurrent_step_native):
  m = max(log f + m, i~); C = exp(log f + m_old - m) C + exp(i~ - m) k^T v; the same for n;
  h = (q C) / (max(|q n|, exp(-m)) + eps). A new document restarts from C = n = 0, m = 0."""
  q = q / np.sqrt(DK)
  log_f = -np.log1p(np.exp(-f_pre))
  hs = np.zeros(v.shape)
  c, n, m = c0.copy(), n0.copy(), m0.copy()
  for b in range(B):
    for t in range(S):
      if t > 0 and seg[b, t] != seg[b, t - 1]:
        c[b], n[b], m[b] = 0, 0, 0
      for h in range(H):
        m_new = max(log_f[b, t, h] + m[b, h], i_pre[b, t, h])
        fa, ia = np.exp(log_f[b, t, h] + m[b, h] - m_new), np.exp(i_pre[b, t, h] - m_new)
        c[b, h] = fa * c[b, h] + ia * np.outer(k[b, t, h], v[b, t, h])
        n[b, h] = fa * n[b, h] + ia * k[b, t, h]
        m[b, h] = m_new
        hs[b, t, h] = q[b, t, h] @ c[b, h] / (max(abs(q[b, t, h] @ n[b, h]), np.exp(-m_new)) + EPS)
  return hs, c, n, m


def inputs(seed, *, big_gates=False):
  rng = np.random.default_rng(seed)
  f = lambda *shape, scale=1.0: scale * rng.standard_normal(shape)
  seg = np.zeros((B, S), np.int32)
  seg[0, 8:] = 1
  seg[0, 16:] = 2
  seg[1, 13:] = 1
  i_pre = soft_cap(jnp.asarray(f(B, S, H, scale=12.0 if big_gates else 3.0)), 15.0)
  return dict(q=f(B, S, H, DK), k=f(B, S, H, DK), v=f(B, S, H, DV), i_pre=np.asarray(i_pre, np.float64),
              f_pre=f(B, S, H, scale=2.0) + 2.0, seg=seg, c0=f(B, H, DK, DV, scale=0.5),
              n0=f(B, H, DK, scale=0.5), m0=f(B, H, scale=2.0))


def ours(inp, kernel, chunk_size=8):
  j = lambda x: jnp.asarray(x, jnp.float32)
  # our state is unstabilised: C = C~ exp(m), n = n~ exp(m)
  scale = jnp.exp(j(inp["m0"]))
  s0 = jnp.concatenate([j(inp["c0"]) * scale[..., None, None], (j(inp["n0"]) * scale[..., None])[..., None]], -1)
  return mlstm_cell(j(inp["q"]), j(inp["k"]), j(inp["v"]), j(inp["i_pre"]), j(inp["f_pre"]),
                    segment_ids=jnp.asarray(inp["seg"]), state={"s": j(s0), "m": j(inp["m0"])}, eps=EPS,
                    kernel=kernel, chunk_size=chunk_size)


@pytest.mark.parametrize("big_gates", [False, True], ids=["gates", "capped-large-gates"])
@pytest.mark.parametrize("kernel", ["reference", "xla"])
def test_cell_equals_the_stabilised_float64_loop(kernel, big_gates):
  inp = inputs(0, big_gates=big_gates)
  h, state = ours(inp, kernel)
  h_ref, c, n, m = stabilised_loop(*(inp[k] for k in ("q", "k", "v", "i_pre", "f_pre", "seg", "c0", "n0", "m0")))
  assert rel_err(h, h_ref) < 1e-5
  assert rel_err(state["m"], m) < 1e-5
  unstab = np.concatenate([c * np.exp(m)[..., None, None], (n * np.exp(m)[..., None])[..., None]], axis=-1)
  assert rel_err(state["s"], unstab) < 1e-5


def test_chunked_gradients_equal_the_token_scan():
  inp = inputs(1)
  cot = np.random.default_rng(2).standard_normal((B, S, H, DV))
  names = ("q", "k", "v", "i_pre", "f_pre", "m0")

  def loss(x, kernel):
    h, state = ours({**inp, **x}, kernel, chunk_size=5)
    return jnp.sum(h * cot) + jnp.sum(jnp.sin(state["s"])) + jnp.sum(state["m"])

  x = {n: jnp.asarray(inp[n], jnp.float32) for n in names}
  g, g_ref = jax.grad(loss)(x, "xla"), jax.grad(loss)(x, "reference")
  for n in names:
    assert float(jnp.linalg.norm(g_ref[n])) > 0, n
    assert rel_err(g[n], g_ref[n]) < 1e-4, n


def test_layer_equals_hugging_face_xlstm_layer():
  """transformers' `xLSTMLayer` (weight_mode single, no bias) with our weights: one 23-token pass (its recurrent
  sequence kernel), then our two segments of 10 + 13 tokens carrying C, n and m; its final state too."""
  torch = pytest.importorskip("torch")
  hf = pytest.importorskip("transformers.models.xlstm.modeling_xlstm",
                           reason="the installed transformers has no xLSTM")
  from transformers import xLSTMConfig

  d = 32
  cfg = MLSTMConfig(vocab_size=50, d_model=d, num_layers=1, num_heads=H, qk_factor=0.5, v_factor=0.75,
                    chunk_size=8, kernel="xla")
  cfg.validate()
  mixer = create_model(cfg, seed=0).blocks[0].mixer
  rng = np.random.default_rng(3)
  for name in ("wi", "wf", "bi", "bf", "norm"):  # away from the init (zeros, -10, ones) so every path shows
    p = getattr(mixer, name)
    p[...] = jnp.asarray(rng.standard_normal(p.shape) * (0.3 if name.startswith("w") else 1.0), jnp.float32) + (
        1.0 if name == "norm" else 0.0)
  hf_cfg = xLSTMConfig(hidden_size=d, num_heads=H, qk_dim_factor=0.5, v_dim_factor=0.75, num_blocks=1,
                       use_bias=False, weight_mode="single", gate_soft_cap=cfg.gate_cap, eps=cfg.eps,
                       norm_eps=cfg.norm_eps, chunk_size=64, mode="inference")
  layer = hf.xLSTMLayer(hf_cfg)
  w = lambda p: np.asarray(p[...], np.float32)
  flat = lambda p: w(p).reshape(d, -1).T
  sd = {"q.weight": flat(mixer.wq), "k.weight": flat(mixer.wk), "v.weight": flat(mixer.wv),
        "ogate_preact.weight": flat(mixer.wog), "igate_preact.weight": w(mixer.wi).T, "igate_preact.bias": w(mixer.bi),
        "fgate_preact.weight": w(mixer.wf).T, "fgate_preact.bias": w(mixer.bf),
        "multihead_norm.weight": w(mixer.norm).reshape(-1), "out_proj.weight": w(mixer.wo).reshape(-1, d).T}
  layer.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in sd.items()})
  x = rng.standard_normal((B, S, d)).astype(np.float32)
  with torch.no_grad():
    want, (c, n, m) = layer(torch.tensor(x))
  want, c, n, m = want.numpy(), c.numpy(), n.numpy(), m.numpy()[..., 0]

  def run(xs, state, start):
    ctx = Context.of(jnp.zeros((B, xs.shape[1]), jnp.int32), jnp.full((B,), start, jnp.int32))
    return mixer(jnp.asarray(xs), state, ctx)

  got, state = run(x, mixer.init_state(B), 0)
  assert rel_err(got, want) < 1e-5
  assert rel_err(state["m"], m) < 1e-5
  assert rel_err(state["s"][..., :-1], c * np.exp(m)[..., None, None]) < 1e-5
  first, state = run(x[:, :10], mixer.init_state(B), 0)
  second, _ = run(x[:, 10:], state, 10)
  assert rel_err(jnp.concatenate([first, second], axis=1), want) < 1e-5


@pytest.mark.parametrize("change,match", [
    (dict(gate_cap=0.0), "gate_cap"), (dict(gate_cap=50.0), "gate_cap"), (dict(chunk_size=0), "chunk_size"),
    (dict(eps=0.0), "eps"), (dict(qk_factor=0.3), "qk_factor"), (dict(head_dim=8), "head_dim"),
    (dict(logit_cap=-1.0), "logit_cap"),
])
def test_config_errors(change, match):
  cfg = MLSTMConfig(vocab_size=50, d_model=32, num_layers=1, num_heads=2)
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(cfg, **change).validate()
