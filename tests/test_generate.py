"""Generation: a streamed prompt + decoding equals one pass, long prompts, sampling, the CLI and its errors."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from longctx import cli
from longctx.data.tokenizers import ByteTokenizer
from longctx.errors import ConfigError
from longctx.generate import (Generator, TextStream, encode_prompt, load_generator, prompt_segments, sample_next,
                              split_prompt)
from longctx.models import Mamba2Config, RMTConfig, TransformerConfig, create_model
from longctx.training.loop import run_training
from longctx import recipe as recipe_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.py")

VOCAB, PAD, SEG, WINDOW, BLOCK = 64, 63, 32, 16, 16
CONFIGS = {  # a token model, a linear recurrence, a blockwise memory model
    "transformer": TransformerConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                     window=WINDOW),
    "mamba2": Mamba2Config(vocab_size=VOCAB, d_model=32, num_layers=2, head_dim=16, state_size=8, chunk_size=8),
    "rmt": RMTConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=WINDOW,
                     block_len=BLOCK, num_memory=4),
}
ONE_PASS = 192  # reference length: prompt + new tokens, padded at the end (nothing before a token sees it)
NEW = 20


@pytest.fixture(scope="module")
def tiny():
  """name -> (model, Generator, one-pass logits function) of a tiny random model, built once per module."""
  built = {}

  def get(name):
    if name not in built:
      model = create_model(CONFIGS[name], seed=1)
      # Two segments per call: a prompt takes several calls, the first padded on the left (whole segments too).
      gen = Generator(model, seg_len=SEG, pad_id=PAD, tokens_per_call=2 * SEG)
      one_pass = jax.jit(lambda tokens: model(tokens, model.init_state(1), reset=jnp.ones(1, bool))[0][0])
      built[name] = model, gen, one_pass
    return built[name]

  return get


def one_pass_logits(one_pass, tokens):
  """Logits `[n, vocab]` of `tokens [n]` read in one segment."""
  padded = np.full((1, ONE_PASS), PAD, np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(one_pass(padded))[:len(tokens)]


@pytest.mark.parametrize("n_prompt", [150, 161, 9])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_generation_equals_one_pass(tiny, name, n_prompt):
  """150: not a multiple of the segment or the block; 161: the padding is a whole segment; 9: shorter than a block.

  Greedy: each new token is the argmax of the one-pass logits over prompt + tokens so far. Sampled: the logits
  each token was drawn from equal the one-pass logits (the continuation varies, unlike greedy's repeats).
  """
  _, gen, one_pass = tiny(name)
  prompt = np.random.default_rng(n_prompt).integers(0, PAD, n_prompt).astype(np.int32)
  for settings in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
    new, logits = gen.generate(prompt, max_new_tokens=NEW, return_logits=True, **settings)
    assert new.shape == (NEW,) and logits.shape == (NEW, VOCAB)
    ref = one_pass_logits(one_pass, np.concatenate([prompt, new]))[n_prompt - 1:-1]
    assert rel_err(logits, ref) < 1e-5, (name, n_prompt, settings, rel_err(logits, ref))
    if settings["temperature"] == 0:
      np.testing.assert_array_equal(new, ref.argmax(-1))
    else:
      assert len(set(new.tolist())) > 5  # a varied continuation
  assert gen.block == (BLOCK if name == "rmt" else 1)  # RMT decodes by re-running its open block


def test_sampling_with_a_seed_is_reproducible(tiny):
  _, gen, _ = tiny("transformer")
  prompt = np.arange(40, dtype=np.int32) % PAD
  a = gen.generate(prompt, max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=7)
  b = gen.generate(prompt, max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=7)
  c = gen.generate(prompt, max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=8)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert gen.generate(prompt, max_new_tokens=3, eos_id=int(a[0]), temperature=1.0, top_p=0.9, seed=7).tolist() == \
      [a[0]]  # stops after the end-of-document token
  assert gen._decode._cache_size() == 1  # one compiled decode step whatever the settings


def test_a_100k_token_prompt_streams(tiny):
  """A sliding-window model forgets beyond layers x window tokens: after 100K tokens it continues as after 64."""
  gen = Generator(tiny("transformer")[0], seg_len=512, pad_id=PAD)
  prompt = np.random.default_rng(0).integers(0, PAD, 100_000).astype(np.int32)
  new, logits = gen.generate(prompt, max_new_tokens=8, return_logits=True)
  short, short_logits = gen.generate(prompt[-64:], max_new_tokens=8, return_logits=True)
  np.testing.assert_array_equal(new, short)
  assert rel_err(logits, short_logits) < 1e-5, rel_err(logits, short_logits)
  assert gen._prefill._cache_size() == 2  # one compiled call shape for the 100K prompt, one for the short


def test_prompt_layout():
  assert [split_prompt(n, block=1) for n in (1, 2, 9)] == [0, 1, 8]
  assert [split_prompt(n, block=4) for n in (1, 4, 5, 9)] == [0, 0, 4, 8]  # 1..block tokens stay open
  calls = prompt_segments(np.arange(1, 6), seg_len=4, per_call=2, pad_id=9)  # 3 pads, then the prompt
  np.testing.assert_array_equal(calls["tokens"][:, :, 0], [[[9, 9, 9, 1], [2, 3, 4, 5]]])
  np.testing.assert_array_equal(calls["segment_ids"][:, :, 0], [[[0, 0, 0, 1], [0, 0, 0, 0]]])
  np.testing.assert_array_equal(calls["reset"][:, :, 0], [[True, False]])
  calls = prompt_segments(np.arange(1, 13), seg_len=4, per_call=2, pad_id=9)  # a whole padding segment
  assert calls["tokens"].shape == (2, 2, 1, 4) and not calls["segment_ids"].any()
  np.testing.assert_array_equal(calls["reset"][:, :, 0], [[True, True], [False, False]])


# ------------------------------------------------------------------------------------------ sampling

PROBS = np.array([0.05, 0.0, 0.3, 0.0, 0.5, 0.15, 0.0, 0.0])  # ids by probability: 4, 2, 5, 0


def draw(n=40_000, **settings):
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (n, len(PROBS)))
  ids = np.asarray(sample_next(logits, key=jax.random.key(0), **settings))
  return np.bincount(ids, minlength=len(PROBS)) / n


def expect(weights):
  w = np.asarray(weights, np.float64)
  return w / w.sum()


@pytest.mark.parametrize("settings,want", [
    (dict(temperature=1.0), PROBS),
    (dict(temperature=0.5), expect(PROBS ** 2)),
    (dict(temperature=1.0, top_k=3), expect(PROBS * (PROBS >= 0.15))),
    (dict(temperature=1.0, top_p=0.7), expect(PROBS * (PROBS >= 0.3))),  # 0.5 < 0.7: 4 and 2 reach it
    (dict(temperature=1.0, top_p=0.81), expect(PROBS * (PROBS >= 0.15))),
    (dict(temperature=1.0, top_k=3, top_p=0.8), expect(PROBS * (PROBS >= 0.3))),  # 0.5/0.95 + 0.3/0.95 > 0.8
    (dict(temperature=1.0, vocab_limit=4), expect(PROBS * (np.arange(8) < 4))),
])
def test_sampling_distribution(settings, want):
  got = draw(**settings)
  assert np.abs(got - want).max() < 0.012, (got, want)  # 40k draws: a few standard deviations


def test_greedy_tiny_top_p_and_top_k_1_are_the_argmax():
  logits = jax.random.normal(jax.random.key(1), (256, 100)) * 3
  best = np.asarray(jnp.argmax(logits, -1))
  for seed in range(3):
    key = jax.random.key(seed)
    for settings in (dict(temperature=0.0, top_p=0.5, top_k=7), dict(temperature=1.0, top_p=1e-6),
                     dict(temperature=2.0, top_k=1)):
      np.testing.assert_array_equal(np.asarray(sample_next(logits, key=key, **settings)), best)
  sampled = [np.asarray(sample_next(logits, key=jax.random.key(s), temperature=1.0)) for s in (0, 0, 1)]
  np.testing.assert_array_equal(sampled[0], sampled[1])
  assert (sampled[0] != sampled[2]).mean() > 0.1 and (sampled[0] != best).mean() > 0.1
  jitted = jax.jit(lambda l, k, t, p, n: sample_next(l, key=k, temperature=t, top_p=p, top_k=n))
  np.testing.assert_array_equal(np.asarray(jitted(logits, jax.random.key(0), 0.0, 1.0, 0)), best)  # traced


def test_text_stream_waits_for_whole_characters():
  tok = ByteTokenizer()
  stream = TextStream(tok, encode_prompt(tok, "café"))
  text = "é ok ü"
  pieces = [stream.push(int(b)) for b in text.encode("utf-8")]
  assert pieces[0] == "" and pieces[1] == "é" and "".join(pieces) + stream.flush() == text
  stream.push(0xC3)  # half a character at the end comes out on flush
  assert stream.flush() == "\ufffd"


# ------------------------------------------------------------------------------------------ CLI


def run_cli(args, capsys):
  code = cli.main(args)
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, eight_devices):
  """A two-step tiny quickstart run (trained on one device) with checkpoints at steps 1 and 2."""
  path = tmp_path_factory.mktemp("generate") / "run"
  overrides = ["train.steps=2", "train.warmup_steps=1", "train.eval_batches=1", "train.checkpoint_every=1",
               "train.async_checkpoint=false", "model.d_model=32", "model.window=16", "data.seg_len=32",
               "data.num_docs=32"]
  cfg = recipe_lib.load_and_check(QUICKSTART, overrides)
  run_training(cfg, path, progress=False, log=lambda *_: None, devices=eight_devices[:1])
  return path


def test_cli_prints_the_continuation_of_the_chosen_step(run_dir, tmp_path, capsys):
  capsys.readouterr()
  prompt = tmp_path / "prompt.txt"
  prompt.write_text("def main():\n    return 'é'\n" * 20)
  code, out, err = run_cli(["generate", str(run_dir), "--prompt-file", str(prompt), "--max-new-tokens", "12",
                            "--step", "1", "--seg-len", "64", "--temperature", "0.8", "--top-k", "50", "--seed",
                            "2", "--no-progress"], capsys)
  assert code == 0, err
  gen, tok = load_generator(run_dir, step=1, seg_len=64)
  new = gen.generate(encode_prompt(tok, prompt.read_text()), max_new_tokens=12, temperature=0.8, top_k=50, seed=2,
                     eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
  assert out == tok.decode(new) + "\n"
  latest, _ = load_generator(run_dir)
  assert rel_err(latest.params["embedding"]["table"], gen.params["embedding"]["table"]) > 1e-4  # step 1 != 2


def test_cli_help_explains_every_option(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["generate", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for option in ("--prompt-file", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--step",
                 "--seg-len", "--ignore-eos", "--no-progress"):
    assert option in out


def test_cli_errors_are_one_line(tmp_path, capsys):
  good = tmp_path / "good.txt"
  good.write_text("hello")
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "binary.txt").write_bytes(b"ok\xff\xfe\x00\x81")
  not_a_run = tmp_path / "not_a_run"
  not_a_run.mkdir()
  cases = [
      (["missing.txt"], "prompt file", "not found"),
      (["empty.txt"], "prompt file", "is empty"),
      (["binary.txt"], "is not UTF-8 text (byte 2"),
      ([".", "--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
      ([".", "--max-new-tokens", "-3"], "--max-new-tokens=-3 must be >= 1"),
      ([".", "--temperature", "-1"], "--temperature=-1.0 must be"),
      ([".", "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
      ([".", "--top-k", "-2"], "--top-k=-2 must be >= 0"),
  ]
  with pytest.raises(ConfigError, match=r"segment length \(--seg-len\) 24 must be a multiple of 16: model rmt"):
    Generator(create_model(CONFIGS["rmt"]), seg_len=24)
  for args, *messages in cases:
    prompt = str(good) if args[0] == "." else str(tmp_path / args[0])
    code, out, err = run_cli(["generate", str(not_a_run), "--prompt-file", prompt, *args[1:]], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    assert all(m in lines[0] for m in messages), (args, err)
    assert out == ""
  code, _, err = run_cli(["generate", str(tmp_path / "no_run"), "--prompt-file", str(good)], capsys)
  assert code == 2 and err.strip().splitlines() == [f"error: run directory '{tmp_path / 'no_run'}' not found; "
                                                    "pass a run dir written by `longctx train`"]
  code, _, err = run_cli(["generate", str(not_a_run), "--prompt-file", str(good)], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1 and "config.json not found" in err
