"""The neural long-term memory of Titans (Behrouz et al. 2025): an MLP whose weights learn at test time.

Per layer, `memory_heads` heads of dim dm = d_model / memory_heads). The memory
is an MLP M (depth D >= 2, hidden width `memory_hidden`, SiLU, no bias) whose *weights* are the state:

    q_t, k_t, v_t = SiLU(x_t W_q), SiLU(x_t W_k), SiLU(x_t W_v);  q_t, k_t L2-normalised (paper sec. 4.4)
    eta_t, theta_t, alpha_t = sigmoid(x_t W_g + b_g)  (theta_t further times memory_lr / memory_hidden)
    loss      l(M; x_t) = ||M(k_t) - v_t||^2
    surprise  S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)
    forget    M_t = (1 - alpha_t) M_{t-1} + S_t
    retrieve  y_t = M*(q_t)   (a forward pass, no update); the heads' retrievals are combined by a
              projection W_o [H, dm, d_model] (as lucidrains' combine_heads)

Chunked update (paper sec. 3.2). Tokens are grouped in chunks of C = `chunk_size`, counted from
the start of each document. The gradients of a chunk's tokens are all taken at the weights M_0
(and momentum S_0) of the chunk start; then momentum and decay are a linear recurrence over the
chunk's tokens, whose end is, with P_t = prod_{j<=t} eta_j and E_t = prod_{t<j<=C} (1 - alpha_j):

    S_C = P_C S_0 - sum_i theta_i (P_C / P_i) g_i
    M_C = E_0 M_0 + (sum_t E_t P_t) S_0 - sum_i theta_i (sum_{t>=i} E_t P_t / P_i) g_i,   g_i = grad l(M_0; x_i)

Both sums are one backward pass each (`jax.vjp` of the per-token losses with those weights as
cotangents); products are exponentials of differences of cumulative log-gates, all <= 0. The inner
gradients are ordinary JAX ops, so the outer loss differentiates through them (second order) into
the projections, the gate maps and the initial weights (tested against the token loop). A token
reads the weights at the start of its chunk: y_t = M_{chunk start}*(q_t). With C = 1 this is the
sequential recurrence with y_t = M_{t-1}*(q_t) (tested). The paper leaves open whether token t
reads M_{t-1} or M_t; reading the weights before the token's own write is what MAC's
h_t = M*_{t-1}(q_t) does, and it is what chunking needs: a token never reads writes of tokens
after it in its chunk.

Streaming. The state carries, per layer, the weights M and momentum S at the last chunk boundary of
the open document plus the open chunk's inputs (k, v and gate logits of the last C tokens, of which
the last `offset` belong to the open chunk). A segment is read in steps of C slots; in each step the
open chunk completes at slot C - offset (if the document goes on that far): the buffered tokens and
the step's first C - offset tokens are folded into M, S; tokens before that read the old weights,
tokens after it the new ones, and tokens of a document that starts inside the step read the learned
initial weights (a new document starts from fresh memory, its chunks counted from its start). So a
document gives the same logits however it is cut: one segment, segments of any length, or token by
token, and wherever it starts in its lane (tested). The extra reads run under `lax.cond` only when
some lane needs them: a segment of whole chunks at offset 0 with documents starting at chunk
boundaries (training with `data.align_documents` = chunk_size, or documents that fill segments)
takes the fast path of one read and one fold per chunk; token-by-token decoding folds every C-th
token.

Memory for the backward pass. A step's backward needs several weight-sized residuals (the weights and
momentum it started from, the two gradient sums, the picks between old and new weights), so a plain
scan over a segment keeps ~10 copies of the memory weights per chunk: at d_model 512 with 8 lanes and
64 chunks per segment, 73 GB for 4 layers. `scan_steps` runs the steps in groups of ~sqrt(chunks),
each rematerialised in the backward pass (`memory_checkpoint`): one carry kept per group, one extra
forward pass of the steps (the train step ~0.87x at d_model 128, 64 chunks, where the plain scan
fits), 5x less memory there (5713 -> 1137 MiB of compiled temporaries, 4 layers, 8 lanes).

This module is the memory's math and its streaming plan, pure functions over `[batch, ...]` arrays;
models/titans.py has its projections and gates (`NeuralMemory`) and the MAG / MAC layers around it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def memory_mlp(ws, x):
  """M(x): `x [..., dm]` through weights `ws = (W_1 [dm, hidden], ..., W_D [hidden, dm])`."""
  for w in ws[:-1]:
    x = jax.nn.silu(x @ w)
  return x @ ws[-1]


def read_memory(ws, x):
  """Per-lane retrieval: ws each `[batch, H, in, out]`, x `[batch, n, H, dm]` -> `[batch, n, H, dm]`."""
  return jax.vmap(jax.vmap(memory_mlp, in_axes=(0, 1), out_axes=1))(ws, x)


def read_shared(ws, x):
  """Retrieval from weights shared by every lane (the initial weights `[H, in, out]`)."""
  return jax.vmap(jax.vmap(memory_mlp, in_axes=(0, 1), out_axes=1), in_axes=(None, 0))(ws, x)


def chunk_update(ws, ss, k, v, z, *, theta_scale: float, grad_clip: float = 0.0):
  """One chunk of one lane and head: weights and momentum at the chunk start -> at its end.

  Args:
    ws, ss: tuples of `[in, out]` (M_0 and S_0).
    k, v: `[C, dm]`; z: `[C, 3]` gate logits (eta, theta, alpha).
    grad_clip: if > 0, each of the chunk's two weighted gradient sums (into S and into M) is scaled
      down to at most this global norm (module docstring, "Deviations").
  Returns:
    (M_C, S_C), every gradient taken at M_0 (module docstring).
  """
  log_eta = jax.nn.log_sigmoid(z[:, 0])
  theta = theta_scale * jax.nn.sigmoid(z[:, 1])
  log_keep = jax.nn.log_sigmoid(-z[:, 2])  # log(1 - alpha)
  lp = jnp.cumsum(log_eta)  # log P_t
  la = jnp.cumsum(log_keep)  # log prod_{j<=t} (1 - alpha_j); log E_t = la[-1] - la[t]
  t_ge_i = jnp.arange(k.shape[0])[:, None] >= jnp.arange(k.shape[0])[None, :]
  expo = jnp.where(t_ge_i, (la[-1] - la + lp)[:, None] - lp[None, :], -jnp.inf)  # [t, i]
  coef_s = theta * jnp.exp(lp[-1] - lp)
  coef_m = theta * jnp.sum(jnp.exp(expo), axis=0)
  losses = lambda w: jnp.sum((memory_mlp(w, k) - v) ** 2, axis=-1)
  _, vjp = jax.vjp(losses, tuple(ws))
  g_s, = vjp(coef_s)
  g_m, = vjp(coef_m)
  if grad_clip > 0:
    g_s, g_m = clip_by_global_norm(g_s, grad_clip), clip_by_global_norm(g_m, grad_clip)
  carry_s = jnp.sum(jnp.exp(la[-1] - la + lp))
  new_s = tuple(jnp.exp(lp[-1]) * s - g for s, g in zip(ss, g_s))
  new_w = tuple(jnp.exp(la[-1]) * w + carry_s * s - g for w, s, g in zip(ws, ss, g_m))
  return new_w, new_s


def clip_by_global_norm(grads: tuple, max_norm: float) -> tuple:
  """Scale a tuple of arrays so their joint L2 norm is at most `max_norm` (safe at zero)."""
  norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads) + 1e-12)
  scale = jnp.minimum(1.0, max_norm / norm)
  return tuple(g * scale for g in grads)


def chunk_update_batched(ws, ss, k, v, z, *, theta_scale: float, grad_clip: float = 0.0):
  """`chunk_update` over lanes and heads: ws, ss `[batch, H, in, out]`; k, v `[batch, C, H, dm]`;
  z `[batch, C, H, 3]`."""
  fn = lambda w, s, k, v, z: chunk_update(w, s, k, v, z, theta_scale=theta_scale, grad_clip=grad_clip)
  return jax.vmap(jax.vmap(fn, in_axes=(0, 0, 1, 1, 1)))(ws, ss, k, v, z)


def _rows(mask, x):
  """Broadcast a per-row mask `[batch]` or per-token mask `[batch, n]` against x."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _pick(mask, a, b):
  return jax.tree.map(lambda x, y: jnp.where(_rows(mask, x), x, y), a, b)


def _take(x, idx):
  """Per-lane gather along axis 1: x `[batch, n, ...]`, idx `[batch, C]` -> `[batch, C, ...]`."""
  return jax.vmap(lambda a, i: a[i])(x, idx)


def step_plan(m, starts, valid):
  """What one step of C slots reads and writes (module docstring, "Streaming").

  Args:
    m: `[batch]` tokens of the open chunk already buffered.
    starts: `[batch, C]` a document starts at this token; valid `[batch, C]` (a prefix of the slots).
  Returns a dict of:
    restart `[batch]`: the step's first token starts a document (the carry is replaced by fresh memory);
    m `[batch]`: the buffered count after that; fold `[batch]`: the open chunk completes in this step;
    after `[batch, C]`: tokens that read the weights after the fold; fresh `[batch, C]`: tokens of a
    document started inside the step (they read the initial weights); doc `[batch, C]`: documents
    started inside the step before each token; new_doc `[batch]`, new_m `[batch]`, r `[batch]` valid slots.
  """
  c = starts.shape[1]
  i = jnp.arange(c)
  restart = starts[:, 0]
  m = jnp.where(restart, 0, m)
  inner = starts & (i > 0)
  j1 = jnp.min(jnp.where(inner, i, c), axis=1)
  jl = jnp.max(jnp.where(inner, i, -1), axis=1)
  r = jnp.sum(valid, axis=1).astype(jnp.int32)
  f = c - m
  fold = f <= jnp.minimum(j1, r)
  carried = valid & (i < j1[:, None])
  new_doc = jl >= 0
  return {"restart": restart, "m": m, "fold": fold, "after": carried & (i >= f[:, None]),
          "fresh": valid & (i >= j1[:, None]), "doc": jnp.cumsum(inner, axis=1), "new_doc": new_doc,
          "new_m": jnp.where(new_doc, r - jl, jnp.where(fold, m + r - c, m + r)).astype(jnp.int32), "r": r}


def restart_carry(carry, plan, init):
  """Rows whose step starts a document take fresh memory (initial weights, zero momentum)."""
  b = plan["m"].shape[0]
  fresh_w = tuple(jnp.broadcast_to(w, (b,) + w.shape) for w in init)
  carry = dict(carry, w=_pick(plan["restart"], fresh_w, carry["w"]),
               s=_pick(plan["restart"], jax.tree.map(jnp.zeros_like, carry["s"]), carry["s"]))
  return carry


def fold_open_chunk(carry, plan, new, *, theta_scale, grad_clip=0.0):
  """Weights and momentum after the open chunk completes (garbage in rows where it does not).

  new: the step's (k, v, z); the chunk is the last `m` buffered tokens then the first C - m new ones.
  """
  c = carry["k"].shape[1]
  idx = (c - plan["m"])[:, None] + jnp.arange(c)

  def fold():
    k, v, z = (_take(jnp.concatenate([carry[n], x], axis=1), idx) for n, x in zip("kvz", new))
    return chunk_update_batched(carry["w"], carry["s"], k, v, z, theta_scale=theta_scale, grad_clip=grad_clip)

  return lax.cond(jnp.any(plan["fold"]), fold, lambda: (carry["w"], carry["s"]))


def read_planned(q, w, w_after, init, plan):
  """Each token's retrieval from the weights it may see: `q [batch, C, H, dm]`."""
  y = read_memory(w, q)
  y = lax.cond(jnp.any(plan["after"]), lambda: jnp.where(_rows(plan["after"], y), read_memory(w_after, q), y),
               lambda: y)
  return lax.cond(jnp.any(plan["fresh"]), lambda: jnp.where(_rows(plan["fresh"], y), read_shared(init, q), y),
                  lambda: y)


def advance_carry(carry, plan, w_after, s_after, new, init):
  """The carry after a step: weights of the open document's last chunk boundary, the last C tokens."""
  c = carry["k"].shape[1]
  b = plan["m"].shape[0]
  fresh_w = tuple(jnp.broadcast_to(w, (b,) + w.shape) for w in init)
  w = _pick(plan["new_doc"], fresh_w, _pick(plan["fold"], w_after, carry["w"]))
  s = _pick(plan["new_doc"], jax.tree.map(jnp.zeros_like, s_after), _pick(plan["fold"], s_after, carry["s"]))
  idx = plan["r"][:, None] + jnp.arange(c)
  bufs = {n: _take(jnp.concatenate([carry[n], x], axis=1), idx) for n, x in zip("kvz", new)}
  return dict(carry, w=w, s=s, m=plan["new_m"], **bufs)


def step_inputs(xs, starts, c):
  """Pad `[batch, s, ...]` arrays to whole steps of c slots -> `[steps, batch, c, ...]`, with starts and valid."""
  b, s = starts.shape
  n = -(-s // c)
  pad = n * c - s

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((b, n, c) + x.shape[2:]).swapaxes(0, 1)

  valid = jnp.broadcast_to(jnp.arange(n * c) < s, (b, n * c))
  return [split(x) for x in xs], split(starts), valid.reshape(b, n, c).swapaxes(0, 1)


def merge_steps(y, s):
  """`[steps, batch, c, ...]` -> `[batch, s, ...]`."""
  y = y.swapaxes(0, 1)
  return y.reshape((y.shape[0], -1) + y.shape[3:])[:, :s]


def checkpoint_group(steps: int, setting: int) -> int:
  """Steps per group of `scan_steps` from the config's `memory_checkpoint` (0 = plain scan).

  setting > 0: that many; -1: off; 0 (auto): ceil(sqrt(steps)) where that keeps fewer carries than the
  plain scan keeps steps (ceil(steps / group) + group < steps, i.e. from 6 steps on), else off.
  """
  if setting:
    return max(setting, 0)
  group = math.isqrt(max(steps, 1) - 1) + 1  # ceil(sqrt(steps))
  return group if -(-steps // group) + group < steps else 0


def scan_steps(body, carry, xs, *, group: int):
  """`lax.scan(body, carry, xs)` whose backward pass keeps only the carry of every `group`-th step.

  The memory's carry holds its weights (`[batch, H, in, out]` per layer of the MLP, twice with the
  momentum) and a step's backward needs several weight-sized residuals, so a plain scan keeps
  ~10 weight copies per chunk of the segment. Here the steps run in groups of `group`, each group
  under `jax.checkpoint`: the forward keeps one carry per group, the backward recomputes a group's
  steps (their residuals alive for that group only). With group ~ sqrt(steps) the memory held goes
  from O(steps) weight copies to O(sqrt(steps)), for one more forward pass of the steps.
  `group` 0 is the plain scan. Steps that do not fill the last group run as a shorter checkpointed group.
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  if group <= 0 or n == 0:
    return lax.scan(body, carry, xs)
  group = min(group, n)
  run = jax.checkpoint(lambda c, x: lax.scan(body, c, x), prevent_cse=False)
  k = n // group
  head = jax.tree.map(lambda x: x[:k * group].reshape((k, group) + x.shape[1:]), xs)
  carry, ys = lax.scan(run, carry, head)
  ys = jax.tree.map(lambda y: y.reshape((k * group,) + y.shape[2:]), ys)
  if n % group:
    carry, tail = run(carry, jax.tree.map(lambda x: x[k * group:], xs))
    ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail)
  return carry, ys


def memory_segment(carry, q, k, v, z, *, starts, init, theta_scale, grad_clip=0.0, checkpoint=0):
  """The neural memory of one layer over a segment (MAG's branch; the tests' entry point).

  Args:
    carry: {"w", "s": tuples of `[batch, H, in, out]`; "k", "v": `[batch, C, H, dm]`;
      "z": `[batch, C, H, 3]`; "m": `[batch]` int32} (module docstring, "State").
    q, k, v: `[batch, seg, H, dm]`; z `[batch, seg, H, 3]` gate logits; float32.
    starts: `[batch, seg]` bool, a document starts at this token (index 0 never: that is `reset`).
    init: tuple of `[H, in, out]`, the initial weights of a new document.
  Returns:
    y `[batch, seg, H, dm]` (each token reads the weights at the start of its chunk) and the new carry.
  """
  c = carry["k"].shape[1]
  (qs, ks, vs, zs), st, valid = step_inputs([q, k, v, z], starts, c)

  def body(carry, inputs):
    q, k, v, z, starts, valid = inputs
    plan = step_plan(carry["m"], starts, valid)
    carry = restart_carry(carry, plan, init)
    new = (k, v, z)
    w_after, s_after = fold_open_chunk(carry, plan, new, theta_scale=theta_scale, grad_clip=grad_clip)
    y = read_planned(q, carry["w"], w_after, init, plan)
    return advance_carry(carry, plan, w_after, s_after, new, init), y

  carry, ys = scan_steps(body, carry, (qs, ks, vs, zs, st, valid), group=checkpoint_group(len(qs), checkpoint))
  return merge_steps(ys, q.shape[1]), carry
