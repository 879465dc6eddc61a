"""Infini-attention (Munkhdalai et al. 2024, "Leave No Context Behind"): softmax attention inside a block
plus a compressive memory of every earlier block of the document.

A document is cut into blocks of `block_len` tokens counted from its first
token (the paper's segments). In every layer and head, with the feature map
s(x) = ELU(x) + 1 and M_0 = 0, z_0 = 0 at the document's start, block s reads

    A_mem   = s(Q_s) M_{s-1} / (s(Q_s) z_{s-1})                       (eq. 3; 0 while the memory is empty)
    A_local = causal softmax attention of Q_s over K_s, V_s           (the block's own tokens only)
    A       = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_local       (eq. 6; beta one learned scalar per head)

and only then takes in the block's keys and values (eq. 4, 5):

    linear: M_s = M_{s-1} + s(K_s)^T V_s
    delta:  M_s = M_{s-1} + s(K_s)^T (V_s - s(K_s) M_{s-1} / (s(K_s) z_{s-1}))
    both:   z_s = z_{s-1} + sum_t s(K_s)_t

`memory_update` picks the rule. The heads' outputs A are concatenated and
projected by W_o. M `[head_dim, head_dim]` and z `[head_dim]` are float32 per
layer and head, so the state is flat in the stream length. The gate follows
the paper: sigmoid(beta) -> 1 reads the memory only. (lucidrains/infini-
transformer-pytorch weights the memory by 1 - sigmoid(beta), the reverse.)

Documents. Blocks are aligned with each document's start, so a document's
logits do not depend on where in a lane it starts or how the lane is cut into
segments; `data.align_documents` is not needed. A document that starts inside
a segment reads the empty memory and attends only to its own keys.

Streaming, any segment length, token by token included. A segment is read in
chunks of c tokens, c the largest divisor of the segment length up to
`block_len` (block_len for segments of whole blocks, 1 for one token), by a
`lax.scan` over chunks. The state holds, per layer, the memory as of the start
of the current block, what the current block's tokens so far will add to it
(since every key of a block is written against the same M_{s-1}, the delta
rule's terms are known as soon as the key is), and the block's keys and values
so far (for the local attention); plus the in-block position of the next token.
In a chunk of c <= block_len tokens the continuing document crosses at most
one block boundary and a document that starts in the chunk none, so a token
reads one of three memories: the block-start one (label 0), the one after the
block that completes in this chunk (label 1), or the empty memory of a new
document (label >= 2); its local attention sees the buffer and the chunk tokens
with its own label. A chunk that is one whole block in every row (segments of
whole blocks, every row at a block start, no document starting inside: the
usual training step) takes a shorter form at run time (`whole_block`: the
chunk's own attention, one memory read, one unmasked write), which
`flops_per_token` counts; any other chunk the general form (`lax.cond`).

Context parallelism (mesh `sequence` axis n > 1 dividing the chunk length): each device keeps c/n
of a chunk's tokens; the local attention runs the ring over the chunk's keys plus the replicated
buffer (`local_attention`, through the attention entry). Memory reads are per token; the writes are sums over the chunk's tokens,
which XLA partitions into an all-reduce of `[batch, heads, dk, dv]` per layer.

Choices the paper leaves open, and deviations:
  * the local attention uses rotary positions inside the block (base `rope_base`);
    the memory reads and writes the unrotated s(q), s(k) (a position-free store);
  * eps = 1e-6 is added to both denominators so the empty memory reads 0;
  * beta starts at `gate_init` (0: an even mix; the paper gives no init); one memory per head, no GQA;
  * the zoo's backbone (pre-RMSNorm residual blocks, gated MLP, optional token
    conv `embed_conv`), so comparisons change only the token mixer;
  * not `kernels.linear_recurrence`: it reads the memory inclusive of each token,
    while here a block reads only earlier blocks; plain einsums do the reads and writes.

The local attention is the one attention entry (layers/attention.py) over two key blocks, the buffer
and the chunk, so it runs dense, flash or Pallas (`model.kernel`) and, over the mesh's `sequence`
axis, as a ring with the buffer as a replicated block.

State per layer (float32; the in-block position of the next token is the shell's `pos` mod block_len):
  mem:    [batch, heads, head_dim, head_dim]  M at the current block's start
  z:      [batch, heads, head_dim]            z at the current block's start
  dmem, dz:  same shapes  what the current block's tokens so far add to M, z
  buf_k, buf_v: [batch, block_len, heads, head_dim]  the current block's unrotated keys and values,
          slot = in-block position (slots at and after the next token's are zero)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from longctx.config import MultiHeadConfig
from longctx.errors import ConfigError
from longctx.layers import Mixer, dense, param, register_mixer
from longctx.layers.attention import Keys, attention, project, rotary
from longctx.layers.context import Context
from longctx.models.base import LM
from longctx.models.registry import register_model

MEMORY_UPDATES = ("linear", "delta")
EPS = 1e-6


@dataclasses.dataclass
class InfiniAttentionConfig(MultiHeadConfig):
  mixer = "infini_attention"
  tiny = {"block_len": 8, "memory_update": "delta"}

  name: str = "infini_attention"
  block_len: int = 128  # the paper's segment: local attention inside a block, memory of the earlier ones
  memory_update: str = "linear"  # "linear" (eq. 4) or "delta" (the delta rule, eq. 5)
  gate_init: float = 0.0  # beta of every head at init: sigmoid(0) = an even mix of memory and local attention
  rope_base: float = 10000.0

  def validate(self) -> None:
    super().validate()
    if self.block_len < 1:
      raise ConfigError(f"model.block_len={self.block_len} must be >= 1 (tokens per block, e.g. 128)")
    if self.memory_update not in MEMORY_UPDATES:
      raise ConfigError(f"model.memory_update={self.memory_update!r} is not one of {MEMORY_UPDATES}")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for rotary positions")


def feature_map(x: jax.Array) -> jax.Array:
  """s(x) = ELU(x) + 1 > 0."""
  return jax.nn.elu(x) + 1.0


def memory_read(sq: jax.Array, mem: jax.Array, z: jax.Array) -> jax.Array:
  """s(q) M / (s(q) z + eps): `sq [batch, n, heads, dk]`, `mem [batch, heads, dk, dv]`, `z [batch, heads, dk]`
  -> `[batch, n, heads, dv]`."""
  num = jnp.einsum("bnhk,bhkv->bnhv", sq, mem)
  den = jnp.einsum("bnhk,bhk->bnh", sq, z)
  return num / (den[..., None] + EPS)


def memory_write(mem: jax.Array, z: jax.Array, sk: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                 rule: str) -> tuple[jax.Array, jax.Array]:
  """What the keys `sk [batch, n, heads, dk]` (= s(k)) and values `v [batch, n, heads, dv]` where
  `mask [batch, n]` (None: every key) add to the block-start memory `mem`, `z`: (dM `[batch, heads, dk, dv]`,
  dz `[batch, heads, dk]`).

  linear: dM = s(K)^T V;  delta: dM = s(K)^T (V - s(K) M / (s(K) z));  dz = sum_t s(K)_t.
  """
  if mask is not None:
    sk = jnp.where(mask[:, :, None, None], sk, 0.0)
  if rule == "delta":
    v = v - memory_read(sk, mem, z)
  return jnp.einsum("bnhk,bnhv->bhkv", sk, v), jnp.sum(sk, axis=1)


def chunk_layout(offset: jax.Array, q_doc: jax.Array, *, block_len: int) -> tuple[jax.Array, jax.Array]:
  """Where each token of a chunk of c <= block_len tokens sits.

  Args:
    offset: `[batch]` in-block position of the chunk's first token, if it continues the state's document.
    q_doc: `[batch, c]` document ids (0 = the state's document, increasing at every document start).
  Returns:
    pos `[batch, c]` in-block position; label `[batch, c]`: 0 = the state's current block, 1 = the next
    block of that document, 2 + i = the first block of the document starting at chunk index i > 0.
  """
  c = q_doc.shape[1]
  idx = jnp.arange(c)[None]
  starts = jnp.concatenate([jnp.ones_like(q_doc[:, :1], bool), q_doc[:, 1:] != q_doc[:, :-1]], axis=1)
  start_idx = lax.cummax(jnp.where(starts, idx, 0), axis=1)
  in_doc = jnp.where(q_doc == 0, offset[:, None] + idx, idx - start_idx)
  return in_doc % block_len, jnp.where(q_doc == 0, in_doc // block_len, 2 + start_idx)


def local_attention(q, k, v, *, buf_k=None, buf_v=None, buf_valid=None, pos, label, rope_base: float,
                    kernel: str = "auto", block: int | None = None):
  """Causal softmax attention of a chunk over [buffer; chunk], keys of the query's own block label.

  Args:
    q: `[batch, c, heads, head_dim]`, k, v `[batch, c, heads, head_dim]` unrotated; buf_k, buf_v
      `[batch, block_len, heads, head_dim]` (slot = in-block position), buf_valid `[batch, block_len]`
      (None: no buffer, the chunk's own keys only).
    pos, label: `[batch, c]` from `chunk_layout` (rotary uses the in-block position `pos`).
  Visibility is by index in [buffer; chunk] (the buffer precedes the chunk) and the same block label; on a
  mesh with a `sequence` axis the chunk's keys go round the ring and the buffer is a replicated block.
  Returns `[batch, c, heads, head_dim]` in q's dtype.
  """
  c = q.shape[1]
  blocks = []
  if buf_k is not None:
    slots = jnp.arange(buf_k.shape[1])
    blocks.append(Keys(rotary(buf_k.astype(k.dtype), slots, base=rope_base), buf_v.astype(v.dtype), pos=slots,
                       doc=jnp.where(buf_valid, 0, -1)))  # the buffer holds the state's current block: label 0
  index = (0 if buf_k is None else buf_k.shape[1]) + jnp.arange(c)
  blocks.append(Keys(rotary(k, pos, base=rope_base), v, pos=index, doc=label, sharded=True))
  return attention(rotary(q, pos, base=rope_base), blocks, q_pos=index, q_doc=label, kernel=kernel,
                   block_size=block, q_sharded=True)


def infini_attention(q, k, v, *, memory: dict, offset, pos, label, beta, rule: str, rope_base: float,
                     kernel: str = "auto"):
  """One layer's Infini-attention over a chunk of c <= block_len tokens.

  Args:
    q, k, v: `[batch, c, heads, head_dim]` unrotated.
    memory: this layer's state: mem `[batch, heads, dk, dv]`, z `[batch, heads, dk]`, dmem, dz (same),
      buf_k, buf_v `[batch, block_len, heads, head_dim]` (see the module docstring), float32.
    offset: `[batch]`; pos, label: `[batch, c]` from `chunk_layout`.
    beta: `[heads]` gate logits.
  Returns:
    The heads' output `[batch, c, heads, head_dim]` float32 and the layer's new memory.

  A chunk that is exactly one block in every row (c = block_len, every row at a block start, no document
  starting inside: the usual training step) takes `whole_block`, the same result without the buffer, the
  second memory read and the masked writes; any other chunk the general form. `lax.cond` picks at run time.
  """
  kw = dict(memory=memory, offset=offset, pos=pos, label=label, beta=beta, rule=rule, rope_base=rope_base,
            kernel=kernel)
  if q.shape[1] != memory["buf_k"].shape[1]:
    return _any_chunk(q, k, v, **kw)
  one_block = jnp.all(offset == 0) & jnp.all(label == 0)
  return lax.cond(one_block, lambda q, k, v: whole_block(q, k, v, **kw), lambda q, k, v: _any_chunk(q, k, v, **kw),
                  q, k, v)


def whole_block(q, k, v, *, memory: dict, offset, pos, label, beta, rule: str, rope_base: float,
                kernel: str = "auto"):
  """`infini_attention` of a chunk that is one whole block in every row (the arguments' shapes as there):
  causal attention over the chunk alone, one read of the block-start memory, one write of every token."""
  del offset
  f32 = lambda a: a.astype(jnp.float32)
  local = local_attention(q, k, v, pos=pos, label=label, rope_base=rope_base, kernel=kernel)
  sq, sk, v32 = feature_map(f32(q)), feature_map(f32(k)), f32(v)
  mem, z = memory["mem"] + memory["dmem"], memory["z"] + memory["dz"]  # dmem, dz are 0 at a block start
  dmem, dz = memory_write(mem, z, sk, v32, None, rule=rule)
  gate = jax.nn.sigmoid(f32(beta))[None, None, :, None]
  out = gate * memory_read(sq, mem, z) + (1 - gate) * f32(local)
  zeros = jnp.zeros_like
  return out, {"mem": mem + dmem, "z": z + dz, "dmem": zeros(dmem), "dz": zeros(dz),
               "buf_k": zeros(memory["buf_k"]), "buf_v": zeros(memory["buf_v"])}


def _any_chunk(q, k, v, *, memory: dict, offset, pos, label, beta, rule: str, rope_base: float,
               kernel: str = "auto"):
  """`infini_attention` of any chunk (the module docstring's three memories per chunk)."""
  f32 = lambda a: a.astype(jnp.float32)
  b, c = q.shape[:2]
  block = memory["buf_k"].shape[1]
  slots = jnp.arange(block)
  buf_valid = slots[None] < offset[:, None]  # [b, block]

  local = local_attention(q, k, v, buf_k=memory["buf_k"], buf_v=memory["buf_v"], buf_valid=buf_valid, pos=pos,
                          label=label, rope_base=rope_base, kernel=kernel)

  # Memory: label-0 tokens complete the current block; M_next is the memory after it.
  sq, sk, v32 = feature_map(f32(q)), feature_map(f32(k)), f32(v)
  mem, z = memory["mem"], memory["z"]
  d0, dz0 = memory_write(mem, z, sk, v32, label == 0, rule=rule)
  dmem0, dz0 = memory["dmem"] + d0, memory["dz"] + dz0
  mem_next, z_next = mem + dmem0, z + dz0
  read_cur = memory_read(sq, mem, z)
  read_next = memory_read(sq, mem_next, z_next) if c > 1 else read_cur  # label 1 needs o + c > block
  sel = lambda l: l[:, :, None, None]
  a_mem = jnp.where(sel(label == 0), read_cur, jnp.where(sel(label == 1), read_next, 0.0))
  gate = jax.nn.sigmoid(f32(beta))[None, None, :, None]
  out = gate * a_mem + (1 - gate) * f32(local)

  # The state after the chunk belongs to its last token's block.
  last, last_pos = label[:, -1], pos[:, -1]
  completes = (last == 1) | ((last == 0) & (last_pos == block - 1))
  cont = (last == 0) & ~completes  # the current block goes on
  base_mem = jnp.where((last == 1)[:, None, None, None], mem_next, 0.0)  # a new document: empty memory
  base_z = jnp.where((last == 1)[:, None, None], z_next, 0.0)
  d_last, dz_last = memory_write(base_mem, base_z, sk, v32, (label == last[:, None]) & (last[:, None] > 0),
                                 rule=rule)
  pick = lambda cond, a, b: jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - cond.ndim)), a, b)
  new = {
      "mem": pick(cont, mem, base_mem + pick(last == 0, mem_next, 0.0)),
      "z": pick(cont, z, base_z + pick(last == 0, z_next, 0.0)),
      "dmem": pick(cont, dmem0, d_last),
      "dz": pick(cont, dz0, dz_last),
  }
  # Buffer slot j holds the token at in-block position j of the last block: chunk index j + c - 1 - last_pos.
  new_offset = (last_pos + 1) % block
  src = slots[None] + (c - 1 - last_pos)[:, None]  # [b, block]
  valid = slots[None] < new_offset[:, None]
  from_chunk, keep = valid & (src >= 0), valid & (src < 0)
  gather_idx = jnp.clip(src, 0, c - 1)[:, :, None, None]
  for key, x in (("buf_k", k), ("buf_v", v)):
    taken = jnp.take_along_axis(f32(x), gather_idx, axis=1)
    new[key] = pick(from_chunk, taken, pick(keep, memory[key], 0.0))
  return out, new


def chunk_len(seg_len: int, block_len: int) -> int:
  """Tokens per scan step: the largest divisor of `seg_len` that is at most `block_len`."""
  return max(c for c in range(1, min(seg_len, block_len) + 1) if seg_len % c == 0)


@register_mixer("infini_attention")
class InfiniAttentionLayer(Mixer):
  """`x [batch, c, d_model]` + one layer's memory -> output `[batch, c, d_model]`, new memory."""

  def __init__(self, cfg: InfiniAttentionConfig, *, layer: int, rngs: nnx.Rngs):
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    self.cfg = cfg
    self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), fan_in=d)
    self.wk = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), fan_in=d)
    self.wv = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), fan_in=d)
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), fan_in=h * hd,
                    scale=1.0 / (2 * cfg.num_layers))
    self.beta = nnx.Param(jnp.full((h,), cfg.gate_init, jnp.float32), logical_axes=("heads",))

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    b, h, hd, block = batch_size, cfg.num_heads, cfg.resolved_head_dim, cfg.block_len
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
    return {"mem": zeros(b, h, hd, hd), "z": zeros(b, h, hd), "dmem": zeros(b, h, hd, hd), "dz": zeros(b, h, hd),
            "buf_k": zeros(b, block, h, hd), "buf_v": zeros(b, block, h, hd)}

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    offset = ctx.start % cfg.block_len
    pos, label = chunk_layout(offset, ctx.doc, block_len=cfg.block_len)
    out, state = infini_attention(project(x, self.wq), project(x, self.wk), project(x, self.wv), memory=state,
                                  offset=offset, pos=pos, label=label, beta=self.beta[...], rule=cfg.memory_update,
                                  rope_base=cfg.rope_base, kernel=cfg.kernel)
    return dense(out.astype(x.dtype), self.wo[...], in_dims=2), state

  @classmethod
  def reach(cls, cfg) -> int:
    return cfg.block_len

  @classmethod
  def flops_per_token(cls, cfg: InfiniAttentionConfig, *, seg_len: int) -> float:
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    c = chunk_len(seg_len, cfg.block_len)
    proj = 2 * 4 * d * h * hd  # q, k, v, o
    per_write = 2 if cfg.memory_update == "delta" else 1  # (+ the delta rule's retrieval)
    if c == cfg.block_len:  # whole blocks: `whole_block`, the chunk's own keys, one read, one write
      return float(proj + 2 * 2 * h * hd * c + 2 * h * hd * hd * (1 + per_write))
    local = 2 * 2 * h * hd * (cfg.block_len + c)  # QK^T and PV over [buffer; chunk]
    reads = 2 if c > 1 else 1  # the block-start memory and the one after a block completes in the chunk
    return float(proj + local + 2 * h * hd * hd * (reads + 2 * per_write))  # two masked writes

  @classmethod
  def activation_bytes_per_token(cls, cfg: InfiniAttentionConfig, *, dtype_bytes: int) -> float:
    d, h, hd, ff = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_d_ff
    return float((4 * d + 4 * h * hd + 3 * ff) * dtype_bytes + h * 2 * cfg.block_len * 4 + 4 * h * hd * 4)


@register_model("infini_attention", config=InfiniAttentionConfig,
                description="Infini-attention: softmax attention in a block + a compressive memory of earlier "
                            "blocks (linear or delta rule), O(1) state")
class InfiniAttention(LM):
  context_parallel = ("ring attention for each chunk's local attention, the block buffer as a local block; "
                      "memory reads per token, writes (sums over the chunk) partitioned by XLA")

  def step_length(self, seg_len: int) -> int:
    """Chunks of c tokens, c the largest divisor of the segment length up to `block_len` (module docstring)."""
    return chunk_len(seg_len, self.cfg.block_len)
