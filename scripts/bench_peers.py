#!/usr/bin/env python
"""Train speed side by side with the public ports: longctx's compiled train step against each peer's
forward + backward + AdamW step, one process per side, both pinned to the same cores.

    pip install -e ".[peers]"                      # torch, x-transformers, transformers, the lucidrains ports
    pip install --no-deps block-recurrent-transformer-pytorch   # its faiss-gpu dependency has no current wheel
    python scripts/bench_peers.py                  # every model with a peer, on core 0
    python scripts/bench_peers.py --models rmt,mamba --cores 0,1 --peer-python /path/to/torch-venv/bin/python

The work is matched: vocab 259, d_model 128, 2 layers, 8 heads of 16 (where a model has heads), `--lanes` rows x
`--segments` segments of `--seg-len` tokens per AdamW step, float32, the recurrent state carried from segment to
segment inside a step and, detached, from step to step; gradients flow through it inside a step where the peer's
do (ours: train.state_gradient=carry) and stop at every segment where the peer detaches it (x-transformers, the
Block-Recurrent port, HF Mamba / Mamba-2, recurrentgemma; ours: train.state_gradient=stop), so both sides do the
same work. Titans
MAC updates its memory once per attention segment on both sides (the peer's 128 tokens + 16 long-term memory tokens;
ours: model.chunk_size=seg_len). Each
side reports its parameter count so the match can be judged; each peer's row names the class and settings used.
Ours runs under the malloc settings the `longctx` command uses on a CPU host (longctx.cli.MALLOC_TUNABLES), the
peer under the host's glibc defaults (the same settings slowed the x-transformers step to 0.63x, measured once).

Peers: x-transformers' TransformerWrapper with Transformer-XL memory (transformer), lucidrains'
recurrent-memory-transformer-pytorch (rmt), block-recurrent-transformer-pytorch (block_recurrent),
infini-transformer-pytorch (infini_attention), titans-pytorch's MemoryAsContextTransformer (titans, against our
MAC variant), Hugging Face transformers' MambaForCausalLM / Mamba2ForCausalLM on their torch paths (mamba,
mamba2; on a CPU their CUDA kernels are absent), its xLSTMForCausalLM (mlstm), and its Qwen3NextForCausalLM with every layer a Gated DeltaNet and
dense MLPs (gated_deltanet; its torch chunked gated delta rule), and Google's own JAX Griffin from recurrentgemma (griffin;
flax linen, `pip install "recurrentgemma[jax]" optax` in the peer's python, a jitted step like ours). A peer that is
not installed gets a row that says so. Not covered: the Memorizing Transformer port (needs faiss-gpu) and fla's RetNet
(needs triton).

Benchmarks measure; tests never assert times. Ratios are ours / peer tokens per second (> 1: longctx faster).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

# model -> (peer description, the module its import needs)
PEERS = {
    "transformer": ("x-transformers TransformerWrapper(Decoder, max_mem_len=window)", "x_transformers"),
    "rmt": ("recurrent-memory-transformer-pytorch RecurrentMemoryTransformer", "recurrent_memory_transformer_pytorch"),
    "block_recurrent": ("block-recurrent-transformer-pytorch BlockRecurrentTransformer",
                        "block_recurrent_transformer_pytorch"),
    "infini_attention": ("infini-transformer-pytorch InfiniTransformer", "infini_transformer_pytorch"),
    "titans": ("titans-pytorch MemoryAsContextTransformer (MAC)", "titans_pytorch"),
    "mamba": ("transformers MambaForCausalLM (torch path)", "transformers"),
    "mamba2": ("transformers Mamba2ForCausalLM (torch path)", "transformers"),
    "mlstm": ("transformers xLSTMForCausalLM (its native chunkwise torch kernel, train mode)", "transformers"),
    "gated_deltanet": ("transformers Qwen3NextForCausalLM, every layer linear attention with a dense MLP "
                       "(torch gated delta rule)", "transformers"),
    "griffin": ("recurrentgemma's JAX Griffin (flax linen), LINEAR_NATIVE scan (its CPU default)", "recurrentgemma"),
}
# The Titans peer implements Memory as Context with one memory update per attention segment (its
# neural_memory_segment_len defaults to segment_len + long-term memory tokens): ours MAC, chunk = segment.
OURS_OVERRIDES = {"titans": ["model.variant=mac", "model.chunk_size={seg_len}"]}
# Peers that detach the carried state at every segment (x-transformers' mems, the Block-Recurrent port's states
# and XL memories; HF's Mamba/Mamba-2 training forward, and recurrentgemma's Griffin run without its cache, carry no
# state at all) do no backward through it: ours then runs with train.state_gradient=stop, the same work. The others
# backpropagate through it, as ours does.
DETACHING_PEERS = ("transformer", "block_recurrent", "mamba", "mamba2", "gated_deltanet", "mlstm", "griffin")
# Peers written in JAX: their own jitted step (run_jax_peer) instead of the torch loop.
JAX_PEERS = ("griffin",)


# ----------------------------------------------------------------------------- our side


def run_ours(args) -> dict:
  import dataclasses

  from longctx import bench
  from longctx.models import get_model_class

  cls = get_model_class(args.model)
  defaults = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
  overrides = [o.format(seg_len=args.seg_len) for o in OURS_OVERRIDES.get(args.model, [])]
  if defaults.get("num_heads"):  # 0 = derived by the model (Mamba-2)
    overrides.append(f"model.num_heads={args.heads}")
  cfg = bench.bench_config(args.model, d_model=args.d_model, seg_len=args.seg_len, lanes=args.lanes,
                           layers=args.layers, window=args.seg_len, dtype="float32", segments=args.segments,
                           overrides=overrides)
  if args.model in DETACHING_PEERS:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, state_gradient="stop"))
  result = bench.bench_train_step(cfg, steps=args.steps, peak_flops=bench.measure_matmul_peak())
  return {"tokens_per_s": result.tokens_per_s, "params": result.params_m * 1e6,
          "config": {**dataclasses.asdict(cfg.model), "d_ff": cfg.model.resolved_d_ff}, "state_gradient": cfg.train.state_gradient}


# ----------------------------------------------------------------------------- the peers' side


def _peer_model(name: str, cfg: dict, args):
  """(torch module, step(tokens [lanes, segments * seg_len], memory) -> (loss, memory))."""
  import torch.nn.functional as F

  d, depth, heads, seg, vocab = cfg["d_model"], cfg["num_layers"], args.heads, args.seg_len, cfg["vocab_size"]
  dim_head = d // heads

  def ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

  def per_segment(forward):
    def step(tokens, memory):
      losses = []
      for s in range(args.segments):
        x = tokens[:, s * seg:(s + 1) * seg]
        logits, memory = forward(x, memory)
        losses.append(ce(logits[:, :-1], x[:, 1:]))
      return sum(losses) / len(losses), memory
    return step

  if name == "transformer":
    from x_transformers import Decoder, TransformerWrapper

    model = TransformerWrapper(num_tokens=vocab, max_seq_len=seg, max_mem_len=cfg["window"], use_abs_pos_emb=False,
                               attn_layers=Decoder(dim=d, depth=depth, heads=heads, attn_dim_head=dim_head,
                                                   rotary_pos_emb=True))
    return model, per_segment(lambda x, mems: model(x, mems=mems, return_mems=True))
  if name == "rmt":
    from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer

    model = RecurrentMemoryTransformer(num_tokens=vocab, num_memory_tokens=cfg["num_memory"], dim=d, depth=depth,
                                       heads=heads, dim_head=dim_head, seq_len=seg)
    return model, per_segment(lambda x, mem: model(x, mem)[:2])
  if name == "block_recurrent":
    from block_recurrent_transformer_pytorch import BlockRecurrentTransformer

    layer = cfg["recurrent_layers"][0] % depth + 1  # ours 0-indexed (negative from the end), theirs 1-indexed
    model = BlockRecurrentTransformer(num_tokens=vocab, dim=d, depth=depth, dim_head=dim_head, heads=heads,
                                      max_seq_len=seg, block_width=cfg["window"], num_state_vectors=cfg["num_states"],
                                      recurrent_layers=(layer,))

    def forward(x, state):
      logits, memories, states = model(x, xl_memories=state[0], states=state[1])
      return logits, (memories, states)

    step = per_segment(forward)
    return model, lambda tokens, memory: step(tokens, memory or ([], []))
  if name == "infini_attention":
    from infini_transformer_pytorch import InfiniTransformer

    model = InfiniTransformer(num_tokens=vocab, dim=d, depth=depth, dim_head=dim_head, heads=heads)
    def forward(x, mems):
      logits, _, memories = model(x, past_memories=mems, return_new_memories=True)
      return logits, memories

    return model, per_segment(forward)
  if name == "titans":
    from titans_pytorch import MemoryAsContextTransformer

    model = MemoryAsContextTransformer(num_tokens=vocab, dim=d, depth=depth, segment_len=seg, heads=heads,
                                       dim_head=dim_head, num_persist_mem_tokens=cfg["num_persistent"],
                                       num_longterm_mem_tokens=16)
    # Its forward takes the whole sequence and segments it itself, carrying the memory between segments.
    return model, lambda tokens, memory: (model(tokens, return_loss=True), None)
  if name in ("mamba", "mamba2"):
    import transformers

    if name == "mamba":
      hf = transformers.MambaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=depth,
                                    state_size=cfg["state_size"], expand=cfg["expand"], conv_kernel=cfg["conv_kernel"],
                                    use_cache=False)
      model = transformers.MambaForCausalLM(hf)
    else:
      inner = cfg["expand"] * d
      hf = transformers.Mamba2Config(vocab_size=vocab, hidden_size=d, num_hidden_layers=depth,
                                     state_size=cfg["state_size"], expand=cfg["expand"], head_dim=cfg["head_dim"],
                                     num_heads=inner // cfg["head_dim"], n_groups=cfg["num_groups"],
                                     conv_kernel=cfg["conv_kernel"], chunk_size=cfg["chunk_size"], use_cache=False)
      model = transformers.Mamba2ForCausalLM(hf)
    # Their training forward takes no carried state: each segment starts from zeros (ours carries it; the
    # carried state is a few KiB per lane, negligible work).
    return model, per_segment(lambda x, _: (model(x).logits, None))
  if name == "mlstm":
    import transformers

    # xLSTM 7B's stack at our size; its training forward (mode "train") starts each segment from zeros.
    hf = transformers.xLSTMConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=depth, num_heads=heads, qk_dim_factor=cfg["qk_factor"],
        v_dim_factor=cfg["v_factor"], ffn_proj_factor=cfg["d_ff"] / d, ffn_round_up_to_multiple_of=cfg["d_ff"],
        gate_soft_cap=cfg["gate_cap"], output_logit_soft_cap=cfg["logit_cap"], chunk_size=cfg["chunk_size"],
        mode="train", autocast_kernel_dtype="float32", use_cache=False, tie_word_embeddings=False)
    model = transformers.xLSTMForCausalLM(hf)
    return model, per_segment(lambda x, _: (model(x).logits, None))
  if name == "gated_deltanet":
    import transformers

    # Qwen3-Next with every layer a Gated DeltaNet and every MLP dense: our stack (its training forward, like
    # HF Mamba's, starts each segment from a zero state; its chunked torch delta rule, 64-token chunks).
    hf = transformers.Qwen3NextConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=depth, layer_types=["linear_attention"] * depth,
        mlp_only_layers=list(range(depth)), intermediate_size=cfg["d_ff"], linear_num_key_heads=heads,
        linear_num_value_heads=cfg["num_value_heads"] or heads, linear_key_head_dim=dim_head,
        linear_value_head_dim=cfg["value_head_dim"] or dim_head, linear_conv_kernel_dim=cfg["conv_kernel"],
        num_attention_heads=heads, num_key_value_heads=heads, use_cache=False)
    model = transformers.Qwen3NextForCausalLM(hf)
    return model, per_segment(lambda x, _: (model(x).logits, None))
  raise ValueError(f"no peer for {name}")


def run_peer(args) -> dict:
  if args.model in JAX_PEERS:
    return run_jax_peer(args)
  import torch

  torch.manual_seed(0)
  torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
  cfg = json.loads(args.config)
  model, step = _peer_model(args.model, cfg, args)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  gen = torch.Generator().manual_seed(0)
  batches = [torch.randint(0, cfg["vocab_size"], (args.lanes, args.segments * args.seg_len), generator=gen)
             for _ in range(2)]
  memory = None
  times = []
  for i in range(args.steps + 1):  # the first is a warm-up
    t0 = time.perf_counter()
    loss, memory = step(batches[i % 2], memory)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    memory = _detached(memory)
    if i:
      times.append(time.perf_counter() - t0)
  times.sort()
  seconds = times[len(times) // 2]
  return {"tokens_per_s": args.lanes * args.segments * args.seg_len / seconds,
          "params": sum(p.numel() for p in model.parameters()), "peer": PEERS[args.model][0]}


def run_jax_peer(args) -> dict:
  """recurrentgemma's Griffin: a jitted forward + backward + AdamW step, the same dict as run_peer."""
  import jax
  import jax.numpy as jnp
  import optax
  from recurrentgemma import common
  from recurrentgemma.jax import griffin

  cfg = json.loads(args.config)
  # recurrentgemma fixes what ours makes configurable: one KV head, rotary on half of each head, a width-4 conv,
  # a tied head.
  fixed = {"num_kv_heads": 1, "rope_fraction": 0.5, "conv_width": 4, "tie_embeddings": True}
  unmatched = [f"{k}={cfg[k]}" for k, v in fixed.items() if cfg[k] != v]
  if unmatched:
    raise ValueError(f"recurrentgemma's Griffin cannot match model.{', model.'.join(unmatched)}")
  types = {"recurrent": common.TemporalBlockType.RECURRENT, "attention": common.TemporalBlockType.ATTENTION}
  pattern = cfg["block_types"].split(",")
  # Its attention_window_size counts the tokens before each token (its mask: q - k <= size), as our window does.
  rg_cfg = common.GriffinConfig(
      vocab_size=cfg["vocab_size"], width=cfg["d_model"], mlp_expanded_width=cfg["d_ff"],
      num_heads=cfg["num_heads"], lru_width=cfg["lru_width"] or cfg["d_model"],
      block_types=tuple(types[pattern[i % len(pattern)]] for i in range(cfg["num_layers"])),
      embeddings_scale_by_sqrt_dim=cfg["embed_scale"], attention_window_size=cfg["window"],
      logits_soft_cap=cfg["logit_cap"], scan_type=common.ScanType.LINEAR_NATIVE)
  # No rematerialisation (its default remats every block; ours runs with train.remat=False).
  model = griffin.Griffin(rg_cfg, gradient_checkpointing=False, dtype=jnp.float32, param_dtype=jnp.float32)
  seg = args.seg_len
  positions = jnp.broadcast_to(jnp.arange(seg), (args.lanes, seg))
  params = model.init(jax.random.key(0), jnp.zeros((args.lanes, seg), jnp.int32), positions, return_cache=False)
  opt = optax.adamw(1e-3)
  opt_state = opt.init(params)

  def loss_fn(params, tokens):
    # Each segment starts from no cache: its training forward, like HF Mamba's, carries no state.
    losses = []
    for s in range(args.segments):
      x = tokens[:, s * seg:(s + 1) * seg]
      logits, _ = model.apply(params, x, positions, return_cache=False)
      losses.append(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean())
    return sum(losses) / len(losses)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  keys = jax.random.split(jax.random.key(0), 2)
  batches = [jax.random.randint(k, (args.lanes, args.segments * seg), 0, cfg["vocab_size"]) for k in keys]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  times = []
  for i in range(args.steps + 1):  # the first compiles: a warm-up
    t0 = time.perf_counter()
    params, opt_state, loss = jax.block_until_ready(step(params, opt_state, batches[i % 2]))
    if i:
      times.append(time.perf_counter() - t0)
  times.sort()
  seconds = times[len(times) // 2]
  return {"tokens_per_s": args.lanes * args.segments * seg / seconds, "params": n_params,
          "peer": PEERS[args.model][0]}


def _detached(tree):
  import torch

  if isinstance(tree, torch.Tensor):
    return tree.detach()
  if hasattr(tree, "_fields"):  # a namedtuple of memories
    return type(tree)(*(_detached(x) for x in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(_detached(x) for x in tree)
  if isinstance(tree, dict):
    return {k: _detached(v) for k, v in tree.items()}
  return tree


# ----------------------------------------------------------------------------- driver


def _side(side: str, python: str, model: str, args, config: dict | None = None) -> dict:
  from longctx.cli import MALLOC_TUNABLES  # the driver runs in longctx's python; a peer's python may lack it

  cmd = ["taskset", "-c", args.cores, python, os.path.abspath(__file__), "--side", side, "--model", model,
         "--d-model", str(args.d_model), "--layers", str(args.layers), "--heads", str(args.heads),
         "--seg-len", str(args.seg_len), "--lanes", str(args.lanes), "--segments", str(args.segments),
         "--steps", str(args.steps)]
  if config is not None:
    cmd += ["--config", json.dumps(config)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  if side == "ours":  # the malloc settings the `longctx` command runs under; the peer keeps the host's default
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)  # (measured: they slow torch, x-transformers 0.63x)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:200]}
  return json.loads(lines[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
  p.add_argument("--cores", default="0", help="cores both sides are pinned to (taskset -c syntax)")
  p.add_argument("--peer-python", default=sys.executable, help="python with torch and the peers installed")
  p.add_argument("--d-model", type=int, default=128, help="model width")
  p.add_argument("--layers", type=int, default=2, help="layers")
  p.add_argument("--heads", type=int, default=8, help="attention heads, where a model has them")
  p.add_argument("--seg-len", type=int, default=128, help="tokens per segment (and the attention window)")
  p.add_argument("--lanes", type=int, default=16, help="rows per step")
  p.add_argument("--segments", type=int, default=2, help="segments per step, the state carried between them")
  p.add_argument("--steps", type=int, default=5, help="timed steps per side (the median counts)")
  p.add_argument("--json", help="write the rows to this file")
  p.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
  p.add_argument("--model", help=argparse.SUPPRESS)
  p.add_argument("--config", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.side:
    try:
      out = run_ours(args) if args.side == "ours" else run_peer(args)
    except ImportError as e:
      print(f"error: {PEERS[args.model][1]} is not importable here ({e}); install the peers extra", file=sys.stderr)
      return 2
    print(json.dumps(out, default=float))
    return 0

  models = [m for m in args.models.split(",") if m]
  unknown = [m for m in models if m not in PEERS]
  if unknown:
    print(f"error: no peer for {', '.join(unknown)}; choose from {', '.join(PEERS)}", file=sys.stderr)
    return 2
  from longctx.cli import MALLOC_TUNABLES

  print(f"ours: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', MALLOC_TUNABLES)} (as the longctx command); "
        f"peers: {os.environ.get('GLIBC_TUNABLES', 'glibc defaults')}")
  print(f"cores {args.cores}: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, {args.lanes} lanes x "
        f"{args.segments} segments x {args.seg_len} tokens per AdamW step, float32", flush=True)
  print(f"{'model':<18}{'ours tok/s':>11}{'params':>10}  {'peer tok/s':>11}{'params':>10}{'ours/peer':>11}  {'state grad':<11}peer",
        flush=True)
  rows = []
  for model in models:
    ours = _side("ours", sys.executable, model, args)
    peer = _side("peer", args.peer_python, model, args, config=ours.get("config")) if "error" not in ours else {
        "error": "ours failed"}
    row = {"model": model, "ours": ours, "peer": peer, "peer_name": PEERS[model][0]}
    if "error" in ours or "error" in peer:
      print(f"{model:<18}  ours: {ours.get('error', 'ok')}  peer: {peer.get('error', 'ok')}", flush=True)
    else:
      row["ratio"] = ours["tokens_per_s"] / peer["tokens_per_s"]
      print(f"{model:<18}{ours['tokens_per_s']:>11.0f}{ours['params'] / 1e6:>9.2f}M  {peer['tokens_per_s']:>11.0f}"
            f"{peer['params'] / 1e6:>9.2f}M{row['ratio']:>10.2f}x  {ours['state_gradient']:<11}{PEERS[model][0]}",
            flush=True)
    rows.append(row)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
