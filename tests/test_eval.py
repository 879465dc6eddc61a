"""Eval suite: streaming scorer vs one pass, exact accuracy bookkeeping, results and plots, bench."""

import json

import jax

import numpy as np
import pytest

from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.data import synthetic
from longctx.data.tokenizers import ByteTokenizer
from longctx.errors import ConfigError
from longctx.eval import report, streaming, tasks
from longctx.eval.streaming import TrainedModel, answer_hits, parse_lengths, score_rows
from longctx.models import TransformerConfig
from longctx.training.trainer import Trainer

from conftest import rel_err

TOK = ByteTokenizer()


def tiny_model(tmp_path, *, mesh=MeshConfig(data=1), seed=0) -> TrainedModel:
  import jax

  devices = jax.devices()[: mesh.data * mesh.fsdp * mesh.tensor]
  cfg = Config(model=TransformerConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=2, window=24),
               data=DataConfig(source="synthetic", batch_size=8, seg_len=16), train=TrainConfig(seed=seed),
               mesh=mesh)
  params = Trainer(cfg, devices=devices).init_train_state()["params"]
  return TrainedModel(cfg=cfg, params=params, step=0, run_dir=tmp_path, tokenizer=TOK, devices=devices)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return tiny_model(tmp_path_factory.mktemp("model"))


def random_rows(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [np.concatenate([[TOK.bos_id], rng.integers(0, 256, n - 1)]).astype(np.int32) for n in lengths]


def test_streamed_scores_equal_one_pass(model, monkeypatch):
  """Segments of 16 (4 per call, several calls in flight) = one 80-token segment, rows of unequal length."""
  rows = random_rows([80, 53, 71])
  nll_one, correct_one = score_rows(model, rows, seg_len=80, progress=False)
  monkeypatch.setattr(streaming, "TOKENS_PER_CALL", 32)  # 2 segments per call -> 3 calls
  nll_seg, correct_seg = score_rows(model, rows, seg_len=16, progress=False)
  assert nll_one.shape == nll_seg.shape == (3, 80)
  for b, r in enumerate(rows):
    n = len(r) - 1  # entries that score a real next token
    assert rel_err(nll_seg[b, :n], nll_one[b, :n]) < 1e-5
    np.testing.assert_array_equal(correct_seg[b, :n], correct_one[b, :n])
  # And each row alone gives its own scores: rows never see each other.
  nll_alone, _ = score_rows(model, rows[1:2], seg_len=16, progress=False)
  assert rel_err(nll_alone[0, :52], nll_one[1, :52]) < 1e-5


def test_scores_match_the_direct_loss(model):
  """score_rows' nll is the model's next-token cross-entropy computed directly in one call."""
  import jax.numpy as jnp
  import optax
  from flax import nnx

  rows = random_rows([40])
  nll, correct = score_rows(model, rows, seg_len=8, progress=False)
  trainer = model.trainer(lanes=1, seg_len=8, segments=1)
  net = nnx.merge(trainer.graphdef, model.params)
  state = net.init_state(1)
  logits, _ = net(jnp.asarray(rows[0][None]), state, reset=jnp.ones((1,), bool))
  want = optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], jnp.asarray(rows[0][1:]))
  assert rel_err(nll[0, :39], want) < 1e-5
  np.testing.assert_array_equal(correct[0, :39], np.argmax(logits[0, :-1], -1) == rows[0][1:])


def test_sharded_scoring_equals_one_device(tmp_path, model, eight_devices):
  sharded = tiny_model(tmp_path, mesh=MeshConfig(data=2, tensor=2, fsdp=2))
  rows = random_rows([40, 33, 21])
  a, ca = score_rows(model, rows, seg_len=8, progress=False)
  b, cb = score_rows(sharded, rows, seg_len=8, progress=False)
  assert rel_err(b, a) < 1e-5
  np.testing.assert_array_equal(ca, cb)


def test_answer_hits_is_exact():
  # tokens:   0    1    2    3    4    5    6    7
  # correct[t] scores token t+1; answer spans [3, 5) and [6, 8).
  correct = np.array([False, False, True, True, False, True, True, False])
  assert answer_hits(correct, [(3, 5), (6, 8)]) == [True, True]
  correct[3] = False  # token 4 mispredicted -> first answer wrong
  assert answer_hits(correct, [(3, 5), (6, 8)]) == [False, True]
  assert answer_hits(correct, [(1, 2)]) == [False] and answer_hits(correct, [(3, 4)]) == [True]


def test_recall_accuracy_bookkeeping(model, monkeypatch):
  """A scorer that is right exactly on chosen rows gives exactly the expected depth x length grid."""
  examples, depths, lengths = 4, [0.0, 0.5, 1.0], [100, 300]
  right_rows = {100: {0, 1, 2, 3, 5}, 300: {8, 11}}  # row = depth_index * examples + i

  def fake_score(m, rows, *, seg_len, progress, desc):
    n = len(rows[0])
    length = 100 if n < 200 else 300
    correct = np.zeros((len(rows), max(len(r) for r in rows)), bool)
    for b in right_rows[length]:
      correct[b] = True
    return np.zeros(correct.shape, np.float32), correct

  monkeypatch.setattr(tasks, "score_rows", fake_score)
  out = tasks.eval_recall(model, "passkey", lengths=lengths, examples=examples, seg_len=16, depths=depths,
                          progress=False)
  np.testing.assert_allclose(out["accuracy"], [[1.0, 0.0], [0.25, 0.0], [0.0, 0.5]])
  np.testing.assert_allclose(out["by_length"], [5 / 12, 2 / 12])
  assert out["cells"] == "depth" and out["cell_values"] == depths and out["answers"] == [12, 12]


def test_recall_examples_deterministic_and_correct():
  a, meta_a = tasks.recall_examples("mqar", length=400, cells=[4, 8], examples=2, seed=3, tokenizer=TOK)
  b, _ = tasks.recall_examples("mqar", length=400, cells=[4, 8], examples=2, seed=3, tokenizer=TOK)
  c, _ = tasks.recall_examples("mqar", length=400, cells=[4, 8], examples=2, seed=4, tokenizer=TOK)
  assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not all(np.array_equal(x, y) for x, y in zip(a, c))
  assert [m["num_pairs"] for m in meta_a] == [4, 4, 8, 8]
  for m in meta_a:
    assert synthetic.check_answer("mqar", m["prompt"]) == m["answers"]


def test_perfect_scorer_gets_full_accuracy_on_real_spans(model, monkeypatch):
  """With a scorer that predicts every next token, every task's spans score 100%; with none, 0%."""
  for value in (True, False):
    monkeypatch.setattr(tasks, "score_rows", lambda m, rows, **kw: (
        np.zeros((len(rows), max(map(len, rows))), np.float32),
        np.full((len(rows), max(map(len, rows))), value)))
    for task in synthetic.TASKS:
      out = tasks.eval_recall(model, task, lengths=[200], examples=2, seg_len=16, progress=False)
      assert out["by_length"] == [1.0 if value else 0.0]


def test_position_loss_bins(model):
  class Docs:
    def documents(self, epoch):
      for n in (90, 40, 130):
        r = random_rows([n], seed=n)[0]
        yield {"tokens": r, "target_mask": np.arange(n) > 0}

  out = tasks.eval_position_loss(model, Docs(), lengths=[32, 64, 100], examples=2, seg_len=16, progress=False)
  assert out["documents"] == 2 and out["doc_tokens"] == [101, 90]  # the two longest, cut to 100 + 1
  assert out["range_edges"] == [0, 32, 64, 100]
  assert out["range_tokens"] == [64.0, 64.0, 36 + 25.0]  # 100 and 89 scored next tokens
  assert sum(out["tokens"]) == 100 + 89
  assert all(np.isfinite(x) for x in out["range_bits_per_token"])
  # How many documents each fine bin averages: both up to position 89, then only the longer one.
  edges, docs = out["bin_edges"], out["bin_documents"]
  assert all(d == (2 if a < 89 else 1) for a, d in zip(edges[:-1], docs)), (edges, docs)


def test_loss_vs_position_plot_says_what_it_shows():
  """Issue 20: the title said loss while the axis said bits per token; nothing marked the window or seg_len;
  nothing said how few documents the right-hand points average; the legend said transformer@300."""
  ppl = {"bin_edges": [0, 1, 2, 4, 8, 16, 32], "bits_per_token": [8.0, 6.0, 5.0, 4.5, 4.4, 4.6],
         "tokens": [8, 8, 16, 30, 40, 20], "bin_documents": [8, 8, 8, 7, 4, 2], "seg_len": 8,
         "range_edges": [0, 32], "range_bits_per_token": [5.0], "range_tokens": [122]}
  run = {"model": "transformer", "step": 300, "window": 4, "seg_len": 8, "label": "",
         "run_dir": "/somewhere/runs/kjv_transformer", "tasks": {"ppl": ppl}}
  fig = report.loss_vs_position_figure([run])
  ax = fig.axes[0]
  assert "bits per token" in ax.get_title() and ax.get_ylabel() == "bits per token"
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend[0] == "kjv_transformer" and not any("transformer@300" in t for t in legend), legend
  assert "kjv_transformer: attention window 4" in legend and "kjv_transformer: segment length 8" in legend
  assert "fewer than 5 documents per point" in legend
  vertical = sorted(l.get_xdata()[0] for l in ax.get_lines() if len(set(l.get_xdata())) == 1)
  assert vertical == [4, 8]
  assert fig.axes[1].get_ylabel().startswith("documents per point")
  assert report.label_of({"model": "transformer", "step": 3}) == "transformer@3"  # no run dir: as before


def test_parse_lengths():
  assert parse_lengths("512,4k, 1M") == [512, 4096, 1048576]
  assert streaming.format_length(4096) == "4k" and streaming.format_length(1000) == "1000"
  with pytest.raises(ConfigError, match="'4q' is not a number like 512, 4k or 1M"):
    parse_lengths("4q")


def test_results_merge_tables_and_plots(tmp_path):
  base = {"model": "transformer", "step": 5, "window": 128, "label": "", "tasks": {}}
  passkey = {"lengths": [128, 512], "by_length": [1.0, 0.2], "chance": 0.0, "cells": "depth",
             "cell_values": [0.0, 1.0], "accuracy": [[1.0, 0.0], [1.0, 0.4]]}
  ppl = {"bin_edges": [0, 1, 2, 4], "bits_per_token": [8.0, 4.0, None], "tokens": [2, 2, 0],
         "range_edges": [0, 2, 4], "range_bits_per_token": [6.0, None], "range_tokens": [4, 0]}
  report.save_results(tmp_path, {**base, "tasks": {"passkey": passkey}})
  report.save_results(tmp_path, {**base, "tasks": {"ppl": ppl}})
  merged = report.load_results(tmp_path)
  assert set(merged["tasks"]) == {"passkey", "ppl"}
  table = report.format_tables([merged, {**merged, "label": "other"}])
  assert "transformer@5" in table and "other" in table and "100.0%" in table and "20.0%" in table
  assert "0-2" in table and "6.0000" in table
  made = report.write_plots([merged], tmp_path)
  assert {p.name for p in made} == {"accuracy_vs_length.png", "loss_vs_position.png", "passkey_heatmap.png"}
  assert all(p.stat().st_size > 1000 for p in made)
  (tmp_path / "results.json").write_text("{broken")
  with pytest.raises(Exception, match="not valid JSON"):
    report.load_results(tmp_path)


def test_bench_train_and_stream_tables(tmp_path, capsys):
  from longctx import cli

  out_json = tmp_path / "bench.json"
  code = cli.main(["bench", "--d-models", "32", "--seg-lens", "64", "--tokens-per-step", "128", "--layers", "1",
                   "--steps", "1", "--window", "32", "--stream-lengths", "128,1k", "--stream-seg-len", "64",
                   "--no-progress", "--json", str(out_json)])
  out = capsys.readouterr().out
  assert code == 0 and "streaming inference" in out and "train step" in out
  rows = json.loads(out_json.read_text())["results"]
  assert [(r["kind"], r["length"]) for r in rows] == [("stream", 128), ("stream", 1024), ("train", 64)]
  for r in rows:
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5 and r["flops_per_token"] > 0 and r["peak_rss_mib"] > 0
  assert rows[0]["x_first"] == 1.0 and rows[1]["x_first"] > 0
  assert all(r["state_kib_per_lane"] > 0 for r in rows)


def test_bench_memory_model_against_baseline_with_overrides(tmp_path, capsys):
  """--set applies to the models that have the field; the state column shows what a lane carries."""
  from longctx import cli

  out_json = tmp_path / "bench.json"
  code = cli.main(["bench", "--models", "transformer,rmt", "--d-models", "32", "--seg-lens", "64",
                   "--tokens-per-step", "128", "--layers", "1", "--steps", "1", "--window", "32", "--no-progress",
                   "--set", "model.num_memory=8", "--json", str(out_json)])
  assert code == 0
  rows = json.loads(out_json.read_text())["results"]
  assert [r["model"] for r in rows] == ["transformer", "rmt"] and rows[0]["x_base"] == 1.0
  # RMT carries the baseline's cache plus 8 x 32 float32 memory slots.
  assert rows[1]["state_kib_per_lane"] - rows[0]["state_kib_per_lane"] == pytest.approx(8 * 32 * 4 / 1024)
  assert cli.main(["bench", "--models", "transformer", "--set", "model.num_memory=8"]) == 2
  assert "model.FIELD=VALUE" in capsys.readouterr().err


def test_bench_reports_a_failed_measurement_as_a_row_and_goes_on(tmp_path, capsys, monkeypatch):
  """A model whose step fails at run time (here: an out-of-memory error raised for RMT's train and stream
  measurements) gets a 'not measured' row with the error's first line; the others are measured; exit 1."""
  import jax

  from longctx import bench, cli

  def oom(real):
    def run(cfg, **kw):
      if cfg.model.name == "rmt":
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 73.1GiB.\nmore")
      return real(cfg, **kw)
    return run

  monkeypatch.setattr(bench, "bench_train_step", oom(bench.bench_train_step))
  monkeypatch.setattr(bench, "bench_stream", oom(bench.bench_stream))
  out_json = tmp_path / "bench.json"
  code = cli.main(["bench", "--models", "transformer,rmt", "--d-models", "32", "--seg-lens", "64",
                   "--tokens-per-step", "128", "--layers", "1", "--steps", "1", "--window", "32", "--no-progress",
                   "--stream-lengths", "128", "--stream-seg-len", "64", "--json", str(out_json)])
  out, err = capsys.readouterr()
  assert code == 1 and "2 of 4 measurements did not run" in err
  failed = [line for line in out.splitlines() if line.startswith("rmt ")]
  assert len(failed) == 2 and all("not measured: JaxRuntimeError: RESOURCE_EXHAUSTED" in line for line in failed)
  assert all("more" not in line for line in failed)
  rows = json.loads(out_json.read_text())["results"]
  assert [(r["model"], r["kind"], bool(r["error"])) for r in rows] == [
      ("transformer", "stream", False), ("transformer", "train", False), ("rmt", "stream", True),
      ("rmt", "train", True)]
  assert rows[1]["tokens_per_s"] > 0 and rows[3]["tokens_per_s"] is None and rows[3]["x_base"] is None


def test_eval_may_resize_memory_but_not_weights(tmp_path):
  """A Memorizing run evaluated with a larger kNN memory (state, not weights) loads; a d_model change does not."""
  from longctx.errors import CheckpointError
  from longctx.models import MemorizingConfig
  from longctx.training.loop import run_training

  cfg = Config(model=MemorizingConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, window=16,
                                      memory_size=32, top_k=4),
               data=DataConfig(source="synthetic", task="passkey", task_length=64, num_docs=64, batch_size=8, prompt_loss_weight=1.0,
                               seg_len=32, segments_per_step=1, align_documents=16),
               train=TrainConfig(steps=1, checkpoint_every=1, eval_batches=1, async_checkpoint=False),
               mesh=MeshConfig(data=-1))
  out = run_training(cfg, tmp_path, progress=False, log=lambda *_: None)
  model = streaming.load_trained(tmp_path, overrides=["model.memory_size=128"])
  assert model.cfg.model.memory_size == 128
  for a, b in zip(jax.tree.leaves(jax.device_get(model.params)), jax.tree.leaves(out["train_state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  nll, _ = score_rows(model, [np.arange(1, 97, dtype=np.int32)], seg_len=32, progress=False)
  assert np.all(np.isfinite(nll[0][:95]))
  with pytest.raises(CheckpointError, match="changes the shapes of the trained weights"):
    streaming.load_trained(tmp_path, overrides=["model.d_model=64"])
