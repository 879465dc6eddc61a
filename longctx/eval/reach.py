"""How far back a model's prediction depends on its input: through attention, and beyond it through memory.

Two measurements per distance d (tokens between the changed / probed token and the predicting one), on
random printable-byte sequences streamed `seg_len` tokens at a time from fresh state:

  forward   the largest change of the last position's log-probabilities (max over the vocabulary, mean
            over samples) when the token d positions earlier is replaced: the dependence the trained
            weights carry. A windowed transformer's is exactly 0 beyond layers x window (+ its embedding
            conv); a working memory's is not.
  gradient  the norm of the last token's loss gradient w.r.t. the input embedding used at distance d,
            backpropagated through every segment (as training's BPTT would if a step spanned them): the
            signal that can teach the memory to write. Measured on the embedding table row of a token id
            that appears only there; `gradient_floor` is the same norm for an id that appears nowhere in
            the input (with tied embeddings the output layer alone gives every row a gradient), so reach
            is `gradient` well above `gradient_floor`.

`longctx eval RUN --task reach` writes both per distance into results.json, prints them and draws
`reach.png`; `--lengths` are the distances.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.errors import ConfigError
from longctx.plotting import pyplot

BACKGROUND = (32, 127)  # the random input: printable ASCII byte ids
PROBE_IDS = (128, 256)  # ids placed at probed distances (one id per distance; bytes a text model rarely sees)


def _stream_fn(graphdef, *, seg_len: int, n_segments: int):
  """tokens `[batch, n]` -> log-probabilities of the last position `[batch, vocab]` (fresh state, one document)."""

  def run(params, tokens):
    model = nnx.merge(graphdef, params)
    b = tokens.shape[0]
    state = model.init_state(b)
    logits = None
    for i in range(n_segments):
      seg = tokens[:, i * seg_len:(i + 1) * seg_len]
      logits, state = model(seg, state, reset=jnp.full((b,), i == 0), segment_ids=jnp.zeros_like(seg))
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32))

  return run


def _table_key(params) -> str:
  """The key path (as `jax.tree_util.keystr`) of the token embedding table in a params pytree."""
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    key = jax.tree_util.keystr(path)
    if "'embedding'" in key and "'table'" in key:
      return key
  raise ConfigError("this model has no embedding table (params ['embedding']['table']); reach cannot probe it")


def _leaf(tree, key: str):
  return next(x for p, x in jax.tree_util.tree_leaves_with_path(tree) if jax.tree_util.keystr(p) == key)


def measure_reach(model, *, distances: Sequence[int], seg_len: int, samples: int = 4, seed: int = 0) -> dict:
  """Forward dependence and gradient reach at each distance (module docstring) for a TrainedModel."""
  distances = sorted({int(d) for d in distances})
  if not distances or distances[0] < 1:
    raise ConfigError(f"reach distances {distances} must be >= 1 (tokens back from the predicting token)")
  vocab = model.cfg.model.vocab_size
  if vocab < PROBE_IDS[0] + len(distances) + 1:
    raise ConfigError(f"reach needs a vocabulary of at least {PROBE_IDS[0] + len(distances) + 1} ids "
                      f"(the model has {vocab}); pass fewer --lengths")
  n = -(-(distances[-1] + 1) // seg_len) * seg_len  # whole segments, the farthest probe inside
  n_segments = n // seg_len
  trainer = model.trainer(lanes=1, seg_len=seg_len, segments=1)
  graphdef, params = trainer.graphdef, jax.device_get(model.params)
  run = jax.jit(_stream_fn(graphdef, seg_len=seg_len, n_segments=n_segments))
  rng = np.random.default_rng(seed)
  last = n - 1
  forward = np.zeros((samples, len(distances)))
  grads = np.zeros((samples, len(distances)))
  floors = np.zeros(samples)
  table_key = _table_key(params)
  probe_ids = np.arange(PROBE_IDS[0], PROBE_IDS[0] + len(distances))
  unused = PROBE_IDS[0] + len(distances)

  def loss(p, tokens, target):
    return -run(p, tokens)[0, target]

  grad_fn = jax.jit(jax.grad(loss))
  for s in range(samples):
    base = rng.integers(*BACKGROUND, size=n).astype(np.int32)
    variants = [base]
    for d in distances:  # the token d back, replaced by another printable byte
      v = base.copy()
      v[last - d] = BACKGROUND[0] + (v[last - d] - BACKGROUND[0] + 1 + rng.integers(0, 90)) % (
          BACKGROUND[1] - BACKGROUND[0])
      variants.append(v)
    logp = np.asarray(run(params, jnp.asarray(np.stack(variants))))
    forward[s] = np.max(np.abs(logp[1:] - logp[:1]), axis=-1)
    probed = base.copy()
    probed[[last - d for d in distances]] = probe_ids
    g = grad_fn(params, jnp.asarray(probed[None]), int(base[-1]))
    table = np.asarray(_leaf(g, table_key))
    grads[s] = np.linalg.norm(table[probe_ids], axis=-1)
    floors[s] = np.linalg.norm(table[unused])
  window = getattr(model.cfg.model, "window", None)
  layers = getattr(model.cfg.model, "num_layers", None)
  return {"task": "reach", "distances": distances, "seg_len": seg_len, "samples": samples, "seed": seed,
          "tokens": n, "window": window, "attention_reach": (window * layers) if window and layers else None,
          "forward": forward.mean(0).tolist(), "forward_max": forward.max(0).tolist(),
          "gradient": grads.mean(0).tolist(), "gradient_floor": float(floors.mean())}


def format_reach(entries: Sequence[tuple[str, dict]]) -> list[str]:
  """Table lines: per run, forward change and gradient (and its floor) per distance."""
  from longctx.eval.streaming import format_length

  distances = sorted({d for _, e in entries for d in e["distances"]})
  head = f"{'reach by distance':<24}" + "".join(f"{format_length(d):>9}" for d in distances)
  lines = ["", head + "   (forward: max |change of log p| at the last token; gradient: |d loss / d embedding|)",
           "-" * len(head)]
  for label, e in entries:
    f, g = dict(zip(e["distances"], e["forward"])), dict(zip(e["distances"], e["gradient"]))
    lines.append(f"{label + ' forward':<24}" + "".join(f"{f[d]:>9.1e}" if d in f else f"{'-':>9}" for d in distances))
    lines.append(f"{label + ' gradient':<24}" + "".join(f"{g[d]:>9.1e}" if d in g else f"{'-':>9}" for d in distances)
                 + f"   (floor {e['gradient_floor']:.1e})")
  return lines


def plot_reach(entries: Sequence[tuple[str, dict]], path):
  """reach.png: forward dependence and gradient vs distance, log-log, one line per run, attention reach marked."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, (label, e) in enumerate(entries):
    color = f"C{i}"
    tiny = 1e-12  # an exact 0 (no dependence) drawn at the bottom of the log axis
    axes[0].plot(e["distances"], np.maximum(e["forward"], tiny), "o-", color=color, label=label)
    axes[1].plot(e["distances"], np.maximum(e["gradient"], tiny), "o-", color=color, label=label)
    axes[1].axhline(max(e["gradient_floor"], tiny), color=color, ls=":", lw=1,
                    label=f"{label}: floor (an id not in the input)")
    if e.get("attention_reach"):
      for ax in axes:
        ax.axvline(e["attention_reach"], color=color, ls="--", lw=0.8)
  axes[0].set_title("forward dependence: max |change of log p| at the last token")
  axes[1].set_title("gradient reach: |d loss / d input embedding|")
  from longctx.eval.streaming import format_length

  ticks = sorted({d for _, e in entries for d in e["distances"]})
  for ax in axes:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ticks, [format_length(d) for d in ticks])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("distance back (tokens); dashed: layers x window")
    ax.legend(fontsize=7)
  axes[0].set_ylabel("nats (an exact 0 is drawn at 1e-12)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
