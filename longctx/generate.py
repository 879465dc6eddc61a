"""Text generation: stream a prompt of any length through the model state, then decode.

    longctx generate runs/quickstart --prompt-file prompt.txt --max-new-tokens 200 --temperature 0.8 --top-p 0.95

    gen = Generator(model, params, seg_len=128)                  # an nnx SegmentLM and its weights
    new = gen.generate(prompt_tokens, max_new_tokens=50)         # greedy: int32 [<= 50]

The prompt. It is read the way `longctx eval` streams documents
(`longctx/eval/streaming.py`): `seg_len` tokens at a time through the model
state, up to `TOKENS_PER_CALL` tokens of segments per compiled call (a
`lax.scan`), so memory is that of one segment whatever the prompt's length and
one compiled function of fixed shape serves every call. The prompt is padded
on the *left*: the first call begins with pad tokens forming a document of
their own, and the prompt starts a new document after them (a segment-id
boundary inside a segment, or `reset` where it starts one), the rule the data
lanes follow. A model reads a document the same wherever it starts in a lane
(the interface's contract, tested per model), so the padding is invisible
and the state after the last call is exactly the state after the prompt
(padding at the end would leave pad tokens in the state).

Decoding. What the streamer leaves unread is the *open block*:

* models that decode token by token (`supports_token_decoding`): the prompt's
  last token. Each step feeds one token (a segment of length 1), keeps the new
  state and samples the next token from its logits.
* the blockwise memory models (RMT, Block-Recurrent, Memorizing, MELODI) read
  whole blocks of `block_len` tokens: their memory is read at the start of a
  block and written at its end, so they cannot take one token at a time. The
  streamer reads the prompt's whole blocks, and the open block holds the 1 to
  `block_len` tokens after them. Each step re-runs the open block, padded on
  the right to `block_len` tokens, *from the state at the last whole-block
  boundary*, and samples from the logits of its last real token (attention
  inside a block is causal, so the padding after it changes nothing). While
  the block is open that boundary state is kept and the sampled token joins
  the block; when the block is full its new state is kept and the next block
  opens with the sampled token. Generation is exact for these models too, at
  one block's forward pass per token.

A token model is the case `block_len = 1`, so one decode step (`decode_step`)
serves both. Sampling (`sample_next`): temperature 0 is greedy (argmax);
otherwise logits / temperature, then top-k (0 = off), then top-p (the smallest
set of most likely tokens whose probability reaches `top_p`), in the order
Hugging Face transformers applies them. Step i draws with
`fold_in(key(seed), i)`, so a seed gives the same tokens every time.
"""

from __future__ import annotations

import math
import pathlib
import sys
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.errors import CheckpointError, ConfigError, DataError
from longctx.eval.streaming import TOKENS_PER_CALL
from longctx.training.trainer import cast_floats


# ---------------------------------------------------------------------------------------- sampling


def check_sampling(*, temperature: float, top_p: float, top_k: int) -> None:
  """One-line errors for sampling settings outside their ranges."""
  if not (temperature >= 0.0 and math.isfinite(temperature)):
    raise ConfigError(f"--temperature={temperature} must be a finite number >= 0 (0 = greedy)")
  if not 0.0 < top_p <= 1.0:
    raise ConfigError(f"--top-p={top_p} must be in (0, 1] (1 = off)")
  if top_k < 0:
    raise ConfigError(f"--top-k={top_k} must be >= 0 (0 = off)")


def sample_next(logits: jax.Array, *, key: jax.Array, temperature=0.0, top_p=1.0, top_k=0,
                vocab_limit=None) -> jax.Array:
  """Next token ids `[batch]` int32 from `logits [batch, vocab]`.

  temperature 0 gives the argmax (greedy). Otherwise tokens are drawn from
  softmax(logits / temperature) restricted to the `top_k` most likely (0 =
  all), then to the smallest set of most likely whose probability (after the
  top-k cut, renormalised) reaches `top_p`; the most likely token is always
  kept. `vocab_limit` (optional) excludes ids >= it (ids the tokenizer lacks).
  Every setting may be a traced scalar: one compiled step serves them all.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  ids = jnp.arange(vocab)
  if vocab_limit is not None:
    logits = jnp.where(ids < vocab_limit, logits, -jnp.inf)
  greedy = jnp.argmax(logits, axis=-1)
  order = jnp.argsort(-logits, axis=-1, stable=True)  # most likely first; ties keep the lower id, as argmax
  scaled = jnp.take_along_axis(logits, order, axis=-1) / jnp.maximum(temperature, 1e-6)
  rank = ids[None, :]
  scaled = jnp.where((top_k <= 0) | (rank < top_k), scaled, -jnp.inf)
  probs = jax.nn.softmax(scaled, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
  keep = (before < top_p) | (top_p >= 1.0) | (rank == 0)  # 1 = off (a sum may round above 1)
  choice = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1)
  sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


# ---------------------------------------------------------------------------------------- prompt layout


def split_prompt(n_tokens: int, *, block: int) -> int:
  """How many of `n_tokens >= 1` prompt tokens the streamer reads: whole blocks, leaving 1..block open."""
  if n_tokens < 1:
    raise DataError("the prompt is empty: it has no tokens")
  return (n_tokens - 1) // block * block


def prompt_segments(tokens: np.ndarray, *, seg_len: int, per_call: int, pad_id: int) -> dict[str, np.ndarray]:
  """`tokens [n]` (n >= 1), padded on the left, as calls of `per_call` segments of one lane.

  Returns tokens and segment_ids `[calls, per_call, 1, seg_len]` int32 and
  reset `[calls, per_call, 1]` bool: the padding is document 0 (reset at the
  first segment), the prompt a new document (a segment-id boundary inside a
  segment, or reset at the segment it starts).
  """
  n = len(tokens)
  chunk = per_call * seg_len
  calls = math.ceil(n / chunk)
  pad = calls * chunk - n
  flat = np.full(calls * chunk, pad_id, np.int32)
  flat[pad:] = tokens
  doc = (np.arange(calls * chunk) >= pad).astype(np.int32).reshape(-1, seg_len)
  reset = np.zeros(len(doc), bool)
  reset[0] = True
  reset[pad // seg_len] |= pad % seg_len == 0
  shape = (calls, per_call, 1, seg_len)
  return {"tokens": flat.reshape(shape), "segment_ids": (doc - doc[:, :1]).reshape(shape),
          "reset": reset.reshape(shape[:3])}


# ---------------------------------------------------------------------------------------- the generator


class Generator:
  """Compiled prompt streamer and decode step of one model (one lane).

  Args:
    model: a `SegmentLM` (concrete, or abstract from `nnx.eval_shape` when
      `params` is given).
    params: its weights (pure dict or `nnx.State`); default: the model's own.
    seg_len: prompt tokens per segment; a multiple of the model's
      `segment_multiple` (its block length).
    compute_dtype: dtype the weights are cast to, as in training.
    pad_id: id of the padding token.
    tokens_per_call: prompt tokens per compiled call (whole segments, at least one).
  """

  def __init__(self, model, params=None, *, seg_len: int, compute_dtype=jnp.float32, pad_id: int = 0,
               tokens_per_call: int = TOKENS_PER_CALL):
    graphdef, own = nnx.split(model)
    self.params = own if params is None else params
    multiple = type(model).segment_multiple(model.cfg)
    if seg_len < 1:
      raise ConfigError(f"segment length (--seg-len) {seg_len} must be >= 1")
    if seg_len % multiple:
      raise ConfigError(f"segment length (--seg-len) {seg_len} must be a multiple of {multiple}: model "
                        f"{model.cfg.name} reads whole blocks of {multiple} tokens")
    self.seg_len, self.pad_id, self.tokens_per_call = seg_len, pad_id, tokens_per_call
    self.block = 1 if type(model).supports_token_decoding else multiple
    self.vocab_size = model.cfg.vocab_size

    def run(p, tokens, state, reset, segment_ids):
      return nnx.merge(graphdef, cast_floats(p, compute_dtype))(tokens, state, reset=reset, segment_ids=segment_ids)

    def prefill(p, state, batch):
      def segment(state, seg):
        _, state = run(p, seg["tokens"], state, seg["reset"], seg["segment_ids"])
        return state, None

      state, _ = jax.lax.scan(segment, state, batch)
      return state, jax.tree.leaves(state)[0].ravel()[:1]  # a small output to wait on

    def decode(p, state, block, n_open, reset, key, step, temperature, top_p, top_k, vocab_limit):
      logits, new_state = run(p, block, state, reset, jnp.zeros_like(block))
      last = jax.lax.dynamic_index_in_dim(logits, n_open - 1, axis=1, keepdims=False).astype(jnp.float32)
      token = sample_next(last, key=jax.random.fold_in(key, step), temperature=temperature, top_p=top_p,
                          top_k=top_k, vocab_limit=vocab_limit)
      full = n_open == block.shape[1]
      state = jax.tree.map(lambda new, old: jnp.where(full, new, old), new_state, state)
      return token, last, state

    self._prefill = jax.jit(prefill, donate_argnums=(1,))
    self._decode = jax.jit(decode, donate_argnums=(1,))
    self._init_state = jax.jit(lambda: model.init_state(1))

  def stream_prompt(self, tokens: Sequence[int], *, progress: bool = False) -> tuple[Any, list[int], bool]:
    """Read the prompt's whole blocks; returns (state, open block tokens, whether the state started).

    The open block holds the last 1..block tokens (see the module docstring);
    the state has not started (needs a reset) when nothing was read.
    """
    tokens = np.asarray(tokens, np.int32)
    n_head = split_prompt(len(tokens), block=self.block)
    state = self._init_state()
    if n_head:
      per_call = max(1, min(math.ceil(n_head / self.seg_len), self.tokens_per_call // self.seg_len))
      calls = prompt_segments(tokens[:n_head], seg_len=self.seg_len, per_call=per_call, pad_id=self.pad_id)
      from tqdm.auto import tqdm

      chunk = per_call * self.seg_len
      first = n_head - (len(calls["tokens"]) - 1) * chunk  # prompt tokens in the first (padded) call
      with tqdm(total=n_head, disable=not progress, unit="tok", unit_scale=True, desc="prompt",
                dynamic_ncols=True, mininterval=0.5, file=sys.stderr) as bar:
        pending = None
        for c in range(len(calls["tokens"])):
          state, marker = self._prefill(self.params, state, {k: v[c] for k, v in calls.items()})
          if pending is not None:  # wait for the previous call while this one runs
            jax.block_until_ready(pending[0])
            bar.update(pending[1])
          pending = (marker, first if c == 0 else chunk)
        jax.block_until_ready(pending[0])
        bar.update(pending[1])
    return state, [int(t) for t in tokens[n_head:]], n_head > 0

  def decode(self, state, open_tokens: Sequence[int], *, started: bool, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             eos_id: int | None = None, vocab_limit: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (token, logits `[vocab]` it was drawn from) for up to `max_new_tokens` new tokens.

    `state` is the state at the open block's start (`started` False: fresh,
    the model still needs its reset), `open_tokens` the 1..block tokens after
    it. Stops after `eos_id` when given.
    """
    check_sampling(temperature=temperature, top_p=top_p, top_k=top_k)
    if max_new_tokens < 1:
      raise ConfigError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    open_tokens = list(open_tokens)
    if not 1 <= len(open_tokens) <= self.block:
      raise ConfigError(f"the open block holds {len(open_tokens)} tokens; it must hold 1..{self.block}")
    key = jax.random.key(seed)
    settings = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k),
                jnp.int32(self.vocab_size if vocab_limit is None else vocab_limit))
    for i in range(max_new_tokens):
      block = np.full((1, self.block), self.pad_id, np.int32)
      block[0, :len(open_tokens)] = open_tokens
      token, logits, state = self._decode(self.params, state, block, jnp.int32(len(open_tokens)),
                                          np.array([not started]), key, jnp.int32(i), *settings)
      token = int(token[0])
      yield token, np.asarray(logits[0])
      if len(open_tokens) == self.block:  # the block was full: its state is kept, a new block opens
        open_tokens, started = [token], True
      else:
        open_tokens.append(token)
      if eos_id is not None and token == eos_id:
        return

  def generate(self, prompt_tokens: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0, eos_id: int | None = None,
               vocab_limit: int | None = None, on_token: Callable[[int], None] | None = None,
               progress: bool = False, return_logits: bool = False):
    """New tokens `[<= max_new_tokens]` int32 after `prompt_tokens [n]` (and their logits `[new, vocab]`)."""
    check_sampling(temperature=temperature, top_p=top_p, top_k=top_k)
    if max_new_tokens < 1:
      raise ConfigError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    state, open_tokens, started = self.stream_prompt(prompt_tokens, progress=progress)
    tokens, logits = [], []
    for token, step_logits in self.decode(state, open_tokens, started=started, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                          eos_id=eos_id, vocab_limit=vocab_limit):
      tokens.append(token)
      logits.append(step_logits)
      if on_token is not None:
        on_token(token)
    tokens = np.asarray(tokens, np.int32)
    return (tokens, np.stack(logits)) if return_logits else tokens


def generate(model, params, prompt_tokens: Sequence[int], *, max_new_tokens: int, seg_len: int,
             compute_dtype=jnp.float32, pad_id: int = 0, **kwargs) -> np.ndarray:
  """One-shot `Generator(model, params, ...).generate(prompt_tokens, ...)`; see `Generator.generate`."""
  gen = Generator(model, params, seg_len=seg_len, compute_dtype=compute_dtype, pad_id=pad_id)
  return gen.generate(prompt_tokens, max_new_tokens=max_new_tokens, **kwargs)


# ---------------------------------------------------------------------------------------- text


class TextStream:
  """Incremental detokenizer: `push(token)` returns the text that token completes.

  Holds back text while it ends in an incomplete UTF-8 character, and decodes
  each token together with the ones before it so that a sentencepiece word's
  leading space survives.
  """

  def __init__(self, tokenizer, context: Sequence[int] = ()):
    self.tokenizer = tokenizer
    self.ids = [int(t) for t in context][-4:]  # a little context: how the first new token joins it
    self.prefix, self.read = 0, len(self.ids)  # ids[prefix:read] were shown; ids[read:] are not yet

  def push(self, token: int) -> str:
    self.ids.append(int(token))
    done = self.tokenizer.decode(self.ids[self.prefix:self.read])
    text = self.tokenizer.decode(self.ids[self.prefix:])
    if len(text) > len(done) and not text.endswith("\ufffd"):
      self.prefix, self.read = self.read, len(self.ids)
      return text[len(done):]
    return ""

  def flush(self) -> str:
    done = self.tokenizer.decode(self.ids[self.prefix:self.read])
    text = self.tokenizer.decode(self.ids[self.prefix:])
    self.prefix = self.read = len(self.ids)
    return text[len(done):]


def read_prompt(path: str) -> str:
  """The text of a prompt file ('-' = stdin): one-line errors if missing, empty or not UTF-8."""
  if path == "-":
    data = sys.stdin.buffer.read()
  else:
    p = pathlib.Path(path)
    if not p.is_file():
      raise DataError(f"prompt file {path!r} not found" + (" (it is a directory)" if p.is_dir() else ""))
    data = p.read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"prompt file {path!r} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                    "pass a text file") from None
  if not text:
    raise DataError(f"prompt file {path!r} is empty; write the prompt to continue into it")
  return text


def load_generator(run_dir: str | pathlib.Path, *, step: int | None = None, seg_len: int | None = None):
  """(Generator on one device, tokenizer) of a run's latest checkpoint, or of training step `step`."""
  from longctx.eval.streaming import load_trained

  run_dir = _check_run_dir(run_dir)
  trained = load_trained(run_dir / "checkpoints" / str(step) if step is not None else run_dir)
  model = nnx.eval_shape(lambda: _build(trained.cfg.model))
  params = jax.device_put(trained.params, jax.devices()[0])  # one lane: one device
  dtype = jnp.bfloat16 if trained.cfg.train.compute_dtype == "bfloat16" else jnp.float32
  seg_len = trained.cfg.data.seg_len if seg_len is None else seg_len
  gen = Generator(model, params, seg_len=seg_len, compute_dtype=dtype,
                  pad_id=trained.tokenizer.pad_id)
  return gen, trained.tokenizer


def encode_prompt(tokenizer, text: str) -> np.ndarray:
  """A prompt's token ids `[n]` int32: BOS, then the text, as the training documents begin."""
  return np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int32)


def run_generate_cli(args) -> int:
  """`longctx generate RUN_DIR --prompt-file F ...`: continuation to stdout as it is decoded."""
  check_sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
  if args.max_new_tokens < 1:
    raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
  _check_run_dir(args.run_dir)  # before reading the prompt: the first problem on the command line first
  text = read_prompt(args.prompt_file)
  gen, tok = load_generator(args.run_dir, step=args.step, seg_len=args.seg_len)
  prompt = encode_prompt(tok, text)
  stream = TextStream(tok, prompt)

  def show(token: int) -> None:
    sys.stdout.write(stream.push(token))
    sys.stdout.flush()

  gen.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               top_k=args.top_k, seed=args.seed, eos_id=None if args.ignore_eos else tok.eos_id,
               vocab_limit=tok.vocab_size, on_token=show, progress=not args.no_progress)
  sys.stdout.write(stream.flush() + "\n")
  sys.stdout.flush()
  return 0


def _check_run_dir(path: str | pathlib.Path) -> pathlib.Path:
  if not pathlib.Path(path).is_dir():
    raise CheckpointError(f"run directory {str(path)!r} not found; pass a run dir written by `longctx train`")
  return pathlib.Path(path)


def _build(model_cfg):
  from longctx.models import build_model

  return build_model(model_cfg, rngs=nnx.Rngs(0))
