"""Golden outputs of every model, captured before the model-shell redesign (issue 23) and checked after it.

Run the capture with the code before the redesign on the path (commit df78d7f), the check with today's:

    git worktree add /tmp/longctx-before df78d7f
    PYTHONPATH=/tmp/longctx-before python scripts/golden_redesign.py capture /tmp/golden
    python scripts/golden_redesign.py check /tmp/golden [CASE ...] [--no-train] [--kernel=reference]

For 18 tiny configs (every model, and variants: GQA, token conv, kNN gate / joint, fixed / LSTM gates,
MELODI with and without its FIFO, RetNet parallel, Mamba's chunked scan, Infini-attention's delta rule,
Titans MAG / MAC) the capture saves the parameters by flat name, logits and final state of a 64-token
stream with documents starting inside segments and blocks, cut several ways (one pass, 16, 7 and token by
token where the model allows), and 3 train steps on a data 2 x fsdp 2 x tensor 2 mesh. The check loads the
same weights into today's models (old parameter names mapped to the shell's), streams the same tokens and
compares logits, the states (old layouts mapped: stacked layers to per-layer dicts, validity masks and
offsets to the shell's position), FLOPs and activation bytes, and the train steps' losses, gradient norms
and parameters.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import pickle  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from longctx import models as M  # noqa: E402
from longctx.models import create_model  # noqa: E402

V = 50
B = 2
N = 64
COMMON = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4)


def cases():
  """name -> (config, cuts, blockwise)."""
  anycut = (N, 16, 7, 1)
  blocks = (N, 16, 32)
  c = {}
  c["transformer"] = (M.TransformerConfig(**COMMON, num_kv_heads=2, window=8, embed_conv=4), anycut)
  c["transformer_pairs"] = (M.TransformerConfig(**COMMON, window=8, attention_impl="pairs", attention_block=8),
                            anycut)
  c["rmt"] = (M.RMTConfig(**COMMON, window=8, block_len=16, num_memory=4, embed_conv=3), blocks)
  c["memorizing"] = (M.MemorizingConfig(**COMMON, num_kv_heads=2, window=8, block_len=16, knn_layers=[-1],
                                        memory_size=24, top_k=6), blocks)
  c["memorizing_joint"] = (M.MemorizingConfig(**COMMON, window=8, block_len=16, knn_layers=[0, 1], memory_size=40,
                                              top_k=5, knn_combine="joint", knn_scale_init=8.0, embed_conv=4),
                           blocks)
  c["block_recurrent"] = (M.BlockRecurrentConfig(**COMMON, window=8, block_len=16, recurrent_layers=[-1],
                                                 num_states=4), blocks)
  c["block_recurrent_lstm"] = (M.BlockRecurrentConfig(**COMMON, num_kv_heads=2, window=8, block_len=16,
                                                      recurrent_layers=[0], num_states=4, gate="lstm",
                                                      state_ffn=True), blocks)
  c["melodi"] = (M.MelodiConfig(**COMMON, window=16, block_len=16, short_memory=4, summary_tokens=4,
                                long_memory_size=8, long_append=2), blocks)
  c["melodi_short"] = (M.MelodiConfig(**COMMON, window=16, block_len=16, short_memory=3, summary_tokens=4,
                                      long_memory_size=0, embed_conv=4), blocks)
  c["retnet"] = (M.RetNetConfig(**COMMON, chunk_size=8, embed_conv=4), anycut)
  c["retnet_parallel"] = (M.RetNetConfig(**COMMON, retention_impl="parallel"), anycut)
  c["mamba"] = (M.MambaConfig(vocab_size=V, d_model=32, num_layers=2, state_size=4), anycut)
  c["mamba_xla"] = (M.MambaConfig(vocab_size=V, d_model=32, num_layers=2, state_size=4, scan_impl="xla",
                                  chunk_size=8, tie_embeddings=False), anycut)
  c["mamba2"] = (M.Mamba2Config(vocab_size=V, d_model=32, num_layers=2, head_dim=16, state_size=8, chunk_size=8,
                                num_groups=2), anycut)
  c["infini_attention"] = (M.InfiniAttentionConfig(**COMMON, block_len=8), anycut)
  c["infini_attention_delta"] = (M.InfiniAttentionConfig(**COMMON, block_len=8, memory_update="delta",
                                                         embed_conv=4), anycut)
  c["titans_mag"] = (M.TitansConfig(**COMMON, window=8, chunk_size=4, memory_heads=2, num_persistent=2,
                                    embed_conv=4), anycut)
  c["titans_mac"] = (M.TitansConfig(**COMMON, variant="mac", chunk_size=4, memory_heads=2, num_persistent=2),
                     anycut)
  return c


def inputs():
  rng = np.random.default_rng(123)
  tokens = rng.integers(0, V, (B, N), dtype=np.int32)
  ids = np.zeros((B, N), np.int32)
  ids[0, 13:] += 1
  ids[0, 40:] += 1  # row 0: documents start at 13 and 40 (inside segments and blocks)
  ids[1, 32:] += 1  # row 1: at 32 (a block start)
  return tokens, ids


def stream(model, step, tokens, ids, seg, state=None):
  b, n = tokens.shape
  state = model.init_state(b) if state is None else state
  outs = []
  for i in range(0, n, seg):
    reset = ids[:, i] != ids[:, i - 1] if i else np.ones((b,), bool)
    seg_ids = ids[:, i:i + seg] - ids[:, i:i + 1]
    logits, state = step(jnp.asarray(tokens[:, i:i + seg]), state, jnp.asarray(reset), jnp.asarray(seg_ids))
    outs.append(np.asarray(logits))
  return np.concatenate(outs, axis=1), state


def make_step(model):
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(tokens, state, reset, segment_ids):
    return nnx.merge(graphdef, params)(tokens, state, reset=reset, segment_ids=segment_ids)

  return run


def flat_params(model):
  from longctx.io.params import flatten_params
  return {k: np.asarray(v) for k, v in flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def train_steps(cfg, seg_len, params_flat=None, rename=None):
  """3 train steps on a data 2 x fsdp 2 x tensor 2 mesh: (losses, grad norms, flat params after)."""
  from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
  from longctx.data.lanes import LaneBatcher
  from longctx.io.params import flatten_params, params_from_flat
  from longctx.training.loop import build_pipeline
  from longctx.training.trainer import Trainer

  full = Config(model=cfg, data=DataConfig(source="synthetic", task="passkey,mqar", task_length=3 * seg_len // 2,
                                           task_min_length=seg_len // 2, prompt_loss_weight=1.0, num_docs=64,
                                           batch_size=8, seg_len=seg_len, segments_per_step=2),
                train=TrainConfig(steps=3, learning_rate=3e-3, warmup_steps=0, async_checkpoint=False),
                mesh=MeshConfig(data=2, fsdp=2, tensor=2))
  full.model = dataclasses.replace(full.model, vocab_size=259)
  pipeline = build_pipeline(full)
  d = full.data
  lanes = LaneBatcher(pipeline.train_source, num_lanes=d.batch_size, seg_len=d.seg_len, align=1,
                      segments_per_step=d.segments_per_step, pad_id=pipeline.tokenizer.pad_id)
  batches = [next(lanes) for _ in range(3)]
  trainer = Trainer(full, devices=jax.devices())
  ts = trainer.init_train_state()
  if params_flat is not None:
    flat = flatten_params(jax.device_get(ts["params"]))
    new = {}
    for name, value in params_flat.items():
      target = rename(name) if rename else name
      assert target in flat, f"{name} -> {target} not in the model ({sorted(flat)[:5]}...)"
      assert flat[target].shape == value.shape, (target, flat[target].shape, value.shape)
      new[target] = value
    assert set(new) == set(flat), sorted(set(flat) - set(new))
    shardings = jax.tree.map(lambda x: x.sharding, ts["params"])
    ts["params"] = jax.device_put(params_from_flat(new, like=jax.device_get(ts["params"])), shardings)
  init = {k: np.asarray(v) for k, v in flatten_params(jax.device_get(ts["params"])).items()}
  losses, norms = [], []
  for b in batches:
    ts, m = trainer.train_step(ts, trainer.put_batch(b))
    m = jax.device_get(m)
    losses.append(float(m["loss"]))
    norms.append(float(m["grad_norm"]))
  after = {k: np.asarray(v) for k, v in flatten_params(jax.device_get(ts["params"])).items()}
  return init, losses, norms, after


def capture(out: pathlib.Path):
  out.mkdir(parents=True, exist_ok=True)
  tokens, ids = inputs()
  only = [a for a in sys.argv[3:] if not a.startswith("--")] or None
  for name, (cfg, cuts) in cases().items():
    if only and name not in only:
      continue
    cfg.validate()
    model = create_model(cfg, seed=0)
    step = make_step(model)
    cls = type(model)
    result = {"config": cfg, "params": flat_params(model), "tokens": tokens, "ids": ids, "cuts": {},
              "flops": {s: cls.flops_per_token(cfg, seg_len=s) for s in (1, 16, 32, 64)},
              "act_bytes": cls.activation_bytes_per_token(cfg, dtype_bytes=2)}
    for seg in cuts:
      logits, state = stream(model, step, tokens, ids, seg)
      result["cuts"][seg] = (logits, jax.tree.map(np.asarray, state))
    seg_len = 32
    init, losses, norms, after = train_steps(cfg, seg_len)
    result["train"] = {"init": init, "losses": losses, "norms": norms, "after": after}
    with open(out / f"{name}.pkl", "wb") as f:
      pickle.dump(result, f)
    print(name, "cuts", list(result["cuts"]), "losses", losses, flush=True)


# ----------------------------------------------------------------------------- check (new code)

import re  # noqa: E402  (check only)

LEGACY_IMPLS = {
    "attention_impl": lambda v: {"kernel": {"flash": "auto", "pairs": "auto", "pallas": "pallas"}[v]},
    "scan_impl": lambda v: {"scan": "associative"} if v == "associative" else {"scan": "chunked", "kernel": v},
    "ssd_impl": lambda v: {"kernel": v},
    "retention_impl": lambda v: ({"retention": "parallel"} if v == "parallel" else
                                 {"retention": "chunked", "kernel": "reference" if v == "recurrent" else v}),
}


def new_config(old):
  import longctx.models as M2
  values = dict(vars(old))
  cls = M2.get_model_class(values["name"]).config_class
  fields = {f.name for f in dataclasses.fields(cls)}
  out = {}
  for key, value in values.items():
    if key in LEGACY_IMPLS:
      out.update(LEGACY_IMPLS[key](value))
    elif key in fields:
      out[key] = value
  dropped = sorted(set(values) - fields - set(LEGACY_IMPLS))
  cfg = cls(**out)
  cfg.validate()
  return cfg, dropped


def rename(name, case):
  m = re.match(r"blocks\.(\d+)\.(.*)", name)
  if m:
    i, rest = m.groups()
    for old, new in (("attn_norm.", "norm."), ("norm1.", "norm."), ("norm2.", "mlp_norm."), ("attn.", "mixer."),
                     ("retention.", "mixer."), ("mlp_norm.", "mlp_norm."), ("mlp.", "mlp."), ("norm.", "norm."),
                     ("mixer.", "mixer.")):
      if rest.startswith(old):
        return f"blocks.{i}.{new}{rest[len(old):]}"
    return f"blocks.{i}.mixer.{rest}"
  m = re.match(r"(mix_short|mix_summary)\.(\d+)\.(.*)", name)
  if m:
    kind, i, rest = m.groups()
    return f"blocks.{i}.{kind}.{rest}"
  if name.startswith("mix_long."):
    return f"blocks.{case['long_layer']}.{name}"
  return name


def load_params(model, flat_old, case):
  from longctx.io.params import flatten_params, params_from_flat
  like = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mine = flatten_params(like)
  new = {rename(k, case): v for k, v in flat_old.items()}
  missing, extra = sorted(set(mine) - set(new)), sorted(set(new) - set(mine))
  assert not missing and not extra, f"missing {missing[:6]}, extra {extra[:6]}"
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params_from_flat(new, like=like))
  nnx.update(model, state)
  return new


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    return float("inf")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def state_pairs(name, cfg, new, old):
  """(what, new leaf, old leaf, kind) to compare; kind "float" (rel err), "exact", "valid" (bool vs derived)."""
  L = cfg.num_layers
  out = []
  pos = np.asarray(new["pos"])
  suffix = lambda n: np.arange(n)[None] >= n - pos[:, None]
  if "prev_tokens" in old:
    out.append(("history", new["history"], old["prev_tokens"], "exact"))
    out.append(("history valid", suffix(old["prev_valid"].shape[1]), old["prev_valid"], "exact"))
  if "valid" in old:
    out.append(("cache valid", suffix(old["valid"].shape[1]), old["valid"], "exact"))
  if name.startswith("transformer") or name in ("rmt", "memorizing", "memorizing_joint", "block_recurrent",
                                                "block_recurrent_lstm", "titans_mag"):
    for i in range(L):
      for key in "kv":
        out.append((f"layer {i} cache {key}", new["blocks"][i][key], old[key][:, i], "float"))
  if name == "rmt":
    out.append(("memory", new["memory"], old["memory"], "float"))
  if name.startswith("memorizing"):
    for layer, mem in old["memory"].items():
      i = int(layer[5:])
      for key in ("k", "v", "valid", "ptr"):
        out.append((f"layer {i} knn {key}", new["blocks"][i]["memory"][key], mem[key],
                    "float" if key in "kv" else "exact"))
  if name.startswith("block_recurrent"):
    for r, i in enumerate(cfg.resolved_recurrent_layers):
      out.append((f"layer {i} recurrent state", new["blocks"][i]["state"], old["memory"][:, r], "float"))
  if name.startswith("melodi"):
    for i in range(L):
      out.append((f"layer {i} short", new["blocks"][i]["short"], old["memory"]["short"][:, i], "float"))
      out.append((f"layer {i} short_valid", np.asarray(new["pos"]) > 0, old["memory"]["short_valid"], "exact"))
    if "long" in old["memory"]:
      j = cfg.resolved_long_layer
      out.append(("long", new["blocks"][j]["long"], old["memory"]["long"], "float"))
      out.append(("long_valid", new["blocks"][j]["long_valid"], old["memory"]["long_valid"], "exact"))
  if name.startswith("retnet"):
    out.append(("pos", new["pos"], old["pos"], "exact"))
    for i in range(L):
      out.append((f"layer {i} s", new["blocks"][i]["s"], old["s"][:, i], "float"))
  if name.startswith("mamba"):
    out.append(("conv valid", suffix(old["conv_valid"].shape[1]), old["conv_valid"], "exact"))
    for i in range(L):
      out.append((f"layer {i} conv", new["blocks"][i]["conv"], old["conv"][:, i], "float"))
      out.append((f"layer {i} ssm", new["blocks"][i]["ssm"], old["ssm"][:, i], "float"))
  if name.startswith("infini"):
    out.append(("offset", np.asarray(new["pos"]) % cfg.block_len, old["offset"], "exact"))
    for i in range(L):
      for key in ("mem", "z", "dmem", "dz", "buf_k", "buf_v"):
        out.append((f"layer {i} {key}", new["blocks"][i][key], old[key][:, i], "float"))
  if name.startswith("titans"):
    out.append(("offset", np.asarray(new["pos"]) % cfg.chunk_size, old["offset"], "exact"))
    keys = ("mem_k", "mem_v", "mem_z") + (("h_k", "h_v", "x_k", "x_v") if cfg.variant == "mac" else ())
    for i in range(L):
      for j in range(cfg.memory_depth):
        out.append((f"layer {i} weights {j}", new["blocks"][i]["weights"][j], old["weights"][j][:, i], "float"))
        out.append((f"layer {i} momentum {j}", new["blocks"][i]["momentum"][j], old["momentum"][j][:, i], "float"))
      for key in keys:
        out.append((f"layer {i} {key}", new["blocks"][i][key], old[key][:, i], "float"))
  return out


def check(where: pathlib.Path):
  kernel = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--kernel=")), None)
  only = [a for a in sys.argv[3:] if not a.startswith("--")] or None
  worst = {}
  for path in sorted(where.glob("*.pkl")):
    name = path.stem
    if only and name not in only:
      continue
    with open(path, "rb") as f:
      old = pickle.load(f)
    cfg, dropped = new_config(old["config"])
    if kernel:
      cfg = dataclasses.replace(cfg, kernel=kernel)
    case = {"long_layer": getattr(cfg, "resolved_long_layer", None)}
    model = create_model(cfg, seed=0)
    load_params(model, old["params"], case)
    step = make_step(model)
    cls = type(model)
    lines = [f"== {name}: dropped config keys {dropped}"]
    flops = {s: cls.flops_per_token(cfg, seg_len=s) for s in old["flops"]}
    if flops != old["flops"]:
      lines.append(f"  FLOPS differ: new {flops} old {old['flops']}")
    act = cls.activation_bytes_per_token(cfg, dtype_bytes=2)
    if act != old["act_bytes"]:
      lines.append(f"  ACT BYTES differ: new {act} old {old['act_bytes']}")
    err_logits, err_state = 0.0, 0.0
    for seg, (logits_old, state_old) in old["cuts"].items():
      logits, state = stream(model, step, old["tokens"], old["ids"], seg)
      e = rel(logits, logits_old)
      err_logits = max(err_logits, e)
      for what, a, b, kind in state_pairs(name, cfg, jax.tree.map(np.asarray, state), state_old):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
          lines.append(f"  cut {seg}: {what}: shape {a.shape} vs {b.shape}")
          continue
        if kind == "exact":
          if not np.array_equal(a, b):
            lines.append(f"  cut {seg}: {what} DIFFERS ({np.sum(a != b)} entries)")
        else:
          err_state = max(err_state, rel(a, b))
          if rel(a, b) > 1e-6:
            lines.append(f"  cut {seg}: {what} rel err {rel(a, b):.2e}")
    lines.append(f"  logits max rel err {err_logits:.2e}, state max rel err {err_state:.2e}")
    if "--no-train" not in sys.argv:
      init, losses, norms, after = train_steps(cfg, 32, params_flat=old["train"]["init"],
                                               rename=lambda n: rename(n, case))
      tl = max(abs(a - b) / abs(b) for a, b in zip(losses, old["train"]["losses"]))
      tn = max(abs(a - b) / abs(b) for a, b in zip(norms, old["train"]["norms"]))
      tp = max(rel(after[rename(k, case)], v) for k, v in old["train"]["after"].items())
      lines.append(f"  train: losses rel {tl:.2e}, grad norms rel {tn:.2e}, params after rel {tp:.2e}")
      worst[name] = (err_logits, err_state, tl, tn, tp)
    else:
      worst[name] = (err_logits, err_state)
    print("\n".join(lines), flush=True)
  print("\nSUMMARY (logits, state, train losses, grad norms, params after):")
  for name, errs in worst.items():
    flag = "OK " if max(errs) <= 1e-6 else "BAD"
    print(f"  {flag} {name:24s} " + " ".join(f"{e:.1e}" for e in errs))


if __name__ == "__main__":
  mode, where = sys.argv[1], pathlib.Path(sys.argv[2])
  if mode == "capture":
    capture(where)
  elif mode == "check":
    check(where)
  else:
    raise SystemExit(f"unknown mode {mode}")
