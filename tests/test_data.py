"""Data layer: lanes (dynamic batching), sources, tokenizers, synthetic tasks."""

import json

import numpy as np
import pytest

from longctx.config import DataConfig
from longctx.data import synthetic
from longctx.data.lanes import LaneBatcher
from longctx.data.document import make_document
from longctx.data.sources import DocumentSource, build_sources
from longctx.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from longctx.errors import ConfigError, DataError

TOK = ByteTokenizer()


class ListSource(DocumentSource):
  """Random-access documents of given lengths; token values encode (doc, position)."""

  def __init__(self, lengths, *, seed=0, shuffle=True, sequential=False):
    super().__init__(seed=seed, shuffle=shuffle)
    self.docs = [make_document(np.arange(n, dtype=np.int32) % 200 + (d % 50), TOK) for d, n in enumerate(lengths)]
    self.num_docs = len(self.docs)
    self._sequential = sequential

  def _load(self, i):
    return self.docs[i]


class StreamSource(ListSource):
  """The same documents, but sequential only (like a hub stream)."""

  @property
  def random_access(self):
    return False


def epoch_documents(batcher_kwargs, source, lanes):
  """Run a non-repeating batcher to the end; rebuild each lane's documents from the batches."""
  lb = LaneBatcher(source, repeat=False, pad_id=TOK.pad_id, **batcher_kwargs)
  per_lane = {lane: [] for lane in lanes}
  for batch in lb:
    K, B, S = batch["tokens"].shape
    for s in range(K):
      for idx, lane in enumerate(lanes):
        toks, seg = batch["tokens"][s, idx], batch["segment_ids"][s, idx]
        for t in range(S):
          new_doc = (t == 0 and batch["reset"][s, idx]) or (t > 0 and seg[t] != seg[t - 1])
          if toks[t] == TOK.pad_id:
            continue
          if new_doc:
            per_lane[lane].append([])
          per_lane[lane][-1].append(int(toks[t]))
  return per_lane


@pytest.mark.parametrize("source_cls", [ListSource, StreamSource])
@pytest.mark.parametrize("seg_len,k", [(16, 1), (7, 3)])
def test_every_token_once_in_order(source_cls, seg_len, k):
  lengths = [1, 30, 16 - 2, 5, 100, 14, 3, 64, 9, 33, 2, 47]  # incl. exactly one segment with BOS/EOS
  src = source_cls(lengths, seed=3)
  lanes = list(range(4))
  got = epoch_documents(dict(num_lanes=4, seg_len=seg_len, segments_per_step=k), src, lanes)
  order = [src.get(0, i)["tokens"].tolist() for i in range(len(lengths))]
  for lane in lanes:
    assert got[lane] == order[lane::4]
  # The union over lanes is every document exactly once.
  assert sorted(map(tuple, sum(got.values(), []))) == sorted(map(tuple, order))


def test_documents_aligned_to_blocks():
  """align=8: every document starts at a multiple of 8 in its lane, padding carries no loss and
  belongs to the document it follows, and every token still arrives once, in order."""
  lengths = [5, 13, 8, 21, 3, 9, 30, 2]
  src = ListSource(lengths, shuffle=False)
  lb = LaneBatcher(src, num_lanes=2, seg_len=16, segments_per_step=2, pad_id=TOK.pad_id, repeat=False, align=8)
  streams = {0: [], 1: []}
  for batch in lb:
    for s in range(2):
      for lane in range(2):
        streams[lane].append({k: batch[k][s, lane] for k in ("tokens", "loss_mask", "segment_ids")}
                             | {"reset": batch["reset"][s, lane]})
  for lane, segs in streams.items():
    tokens = np.concatenate([x["tokens"] for x in segs])
    loss = np.concatenate([x["loss_mask"] for x in segs])
    starts = np.concatenate([[x["reset"]] + list(np.diff(x["segment_ids"]) > 0) for x in segs])
    assert all(p % 8 == 0 for p in np.flatnonzero(starts))
    assert not np.any(loss[tokens == TOK.pad_id])
    docs = [lengths[j] for j in range(lane, len(lengths), 2)]
    real = tokens[tokens != TOK.pad_id]
    expect = np.concatenate([src.docs[j]["tokens"] for j in range(lane, len(lengths), 2)])
    np.testing.assert_array_equal(real, expect)
    # Each document occupies whole blocks: its padded length.
    doc_starts = np.flatnonzero(starts)[:len(docs)]
    np.testing.assert_array_equal(np.diff(doc_starts), [-(-len(src.docs[j]["tokens"]) // 8) * 8
                                                        for j in range(lane, len(lengths), 2)][:len(docs) - 1])
  with pytest.raises(DataError, match="the document alignment 8 must divide seg_len=12 or be a multiple of it"):
    LaneBatcher(src, num_lanes=2, seg_len=12, segments_per_step=1, pad_id=TOK.pad_id, align=8)
  with pytest.raises(ConfigError, match="align_documents"):
    DataConfig(seg_len=12, align_documents=8).validate()


def test_lane_ranges_partition_the_lanes():
  src = ListSource([5, 40, 17, 8, 90, 3, 12, 26, 31], seed=1)
  whole = epoch_documents(dict(num_lanes=4, seg_len=8, segments_per_step=2), src, range(4))
  for lo, hi in [(0, 2), (2, 4), (1, 3)]:
    part = epoch_documents(dict(num_lanes=4, seg_len=8, segments_per_step=2, lane_range=(lo, hi)), src, range(lo, hi))
    for lane in range(lo, hi):
      assert part[lane] == whole[lane]


def test_labels_masks_segment_ids_reset_by_hand():
  # One lane: doc A = [BOS a0 a1 EOS] (4 tokens), doc B = [BOS b0 b1 b2 b3 EOS] (6 tokens); seg_len 4.
  src = ListSource([2, 4], shuffle=False)
  a, b = (src.get(0, i)["tokens"] for i in range(2))
  lb = LaneBatcher(src, num_lanes=1, seg_len=4, segments_per_step=3, repeat=False, pad_id=TOK.pad_id)
  batch = next(lb)
  stream = np.concatenate([a, b, [TOK.pad_id] * 2])
  np.testing.assert_array_equal(batch["tokens"][:, 0].reshape(-1), stream)
  np.testing.assert_array_equal(batch["labels"][:, 0].reshape(-1), np.concatenate([stream[1:], [TOK.pad_id]]))
  # Targets: within a doc, every token after BOS; never across docs; never padding.
  expect_mask = [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0]
  np.testing.assert_array_equal(batch["loss_mask"][:, 0].reshape(-1), expect_mask)
  # Segments: [A], [B0..B3], [B4 B5 pad pad]: the last has ids 0,0,1,1 (padding is its own document).
  np.testing.assert_array_equal(batch["segment_ids"][:, 0], [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(batch["reset"][:, 0], [True, True, False])
  with pytest.raises(StopIteration):
    next(lb)


def test_answer_only_targets_pass_through_lanes():
  doc, meta = synthetic.make_example("passkey", rng=np.random.default_rng(0), length_tokens=200, tokenizer=TOK)

  class One(DocumentSource):
    num_docs = 1

    def _load(self, i):
      return doc

  lb = LaneBatcher(One(shuffle=False), num_lanes=1, seg_len=64, segments_per_step=5, repeat=False, pad_id=TOK.pad_id)
  batch = next(lb)
  targets = batch["labels"][batch["loss_mask"] > 0]
  assert TOK.decode(targets) == f" {meta['answers'][0]}."
  # With a prompt loss weight, prompt labels weigh it, answers 1, padding and BOS 0.
  doc, meta = synthetic.make_example("passkey", rng=np.random.default_rng(0), length_tokens=200, tokenizer=TOK,
                                     prompt_loss_weight=0.3)
  batch = next(LaneBatcher(One(shuffle=False), num_lanes=1, seg_len=64, segments_per_step=5, repeat=False,
                           pad_id=TOK.pad_id))
  n = len(doc["tokens"]) - 1  # labels of the document: tokens 1..n
  weights = batch["loss_mask"].reshape(-1)
  np.testing.assert_allclose(weights[:n], np.where(doc["target_mask"][1:], 1.0, 0.3))
  assert np.all(weights[n:] == 0)
  assert TOK.decode(batch["labels"].reshape(-1)[:n][weights[:n] == 1]) == f" {meta['answers'][0]}."


def test_deterministic_and_restorable():
  src = ListSource([int(n) for n in np.random.default_rng(0).integers(1, 80, 40)], seed=7)
  kwargs = dict(num_lanes=3, seg_len=10, segments_per_step=2, pad_id=TOK.pad_id)
  a = LaneBatcher(src, **kwargs)
  b = LaneBatcher(src, **kwargs)
  first = [next(a) for _ in range(30)]
  for x, y in zip(first, (next(b) for _ in range(30))):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  saved = json.loads(json.dumps(a.state_dict()))  # must survive JSON
  cont = [next(a) for _ in range(20)]
  c = LaneBatcher(src, **kwargs)
  c.load_state_dict(saved)
  for x in cont:
    y = next(c)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  with pytest.raises(DataError, match="different lane layout"):
    LaneBatcher(src, **{**kwargs, "num_lanes": 4}).load_state_dict(saved)


def test_streaming_source_restores_too():
  src = StreamSource([int(n) for n in np.random.default_rng(1).integers(1, 50, 25)], seed=2)
  kwargs = dict(num_lanes=2, seg_len=8, segments_per_step=1, pad_id=TOK.pad_id)
  a = LaneBatcher(src, **kwargs)
  for _ in range(40):
    next(a)
  saved = a.state_dict()
  expect = [next(a) for _ in range(40)]  # crosses into later epochs
  b = LaneBatcher(src, **kwargs)
  b.load_state_dict(saved)
  for x in expect:
    np.testing.assert_array_equal(x["tokens"], next(b)["tokens"])


def test_epochs_reshuffle():
  src = ListSource(list(range(1, 30)), seed=0)
  assert src.order(0).tolist() != src.order(1).tolist()
  assert sorted(src.order(1).tolist()) == list(range(29))


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
  text = "héllo, wörld — 長い文脈"
  assert TOK.decode(TOK.encode(text)) == text
  assert TOK.vocab_size == 259 and {TOK.bos_id, TOK.eos_id, TOK.pad_id} == {256, 257, 258}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  rng = np.random.default_rng(0)
  words = ["the", "river", "mill", "light", "wind", "leaves", "clock", "bread", "road", "hills", "cloud", "town", "cat"]
  text = "\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(400))
  (d / "corpus.txt").write_text(text)
  return train_sentencepiece([str(d / "corpus.txt")], model_prefix=str(d / "tok"), vocab_size=300)


def test_sentencepiece_train_and_load(sp_model):
  tok = load_tokenizer(sp_model)
  assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 300
  assert tok.decode(tok.encode("the river the mill.")) == "the river the mill."
  assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3


# Text a long-document tokenizer must not change: code with tabs, indentation and blank lines, LaTeX, emoji,
# CJK, characters absent from the training text, runs of spaces, CRLF, digits, control characters.
ROUND_TRIP = [
    "def f(x):\n\tif x:\n\t\treturn  x  # two spaces\n\n\n    pass\n",
    "\\begin{document}\n\\section{Intro} $\\int_0^1 x^2\\,dx$ % a comment\n\\end{document}\n",
    "emoji 😀🎉👩‍🔬 and CJK 漢字かな한국어 and ﬁ ligature, Ｆｕｌｌ width, é vs é",
    "   leading spaces, trailing spaces   ", "\r\nwindows\r\nlines\r\n", "pi 3.14159 and 1234567890",
    "\x00\x01\x7f control \u2028 separator", "Ω absent ☃ from ∮ training ⁂",
]


def test_sentencepiece_is_lossless_by_default(tmp_path):
  """decode(encode(x)) == x on arbitrary UTF-8, with no UNK. Before: NFKC normalisation, whitespace runs and
  newlines collapsed (generated text had no line breaks), unseen characters became UNK
  (`\\begin{document}` -> ` ⁇ begin ⁇ document ⁇ `). `--sentencepiece-defaults` keeps the old behaviour."""
  from longctx import cli

  corpus = tmp_path / "train.txt"
  corpus.write_text("\n".join(f"the river {i} runs past the mill, and the wind turns it." for i in range(300)))
  tok = load_tokenizer(train_sentencepiece([str(corpus)], model_prefix=str(tmp_path / "lossless"), vocab_size=290))
  for text in ROUND_TRIP:
    ids = tok.encode(text)
    assert tok.decode(ids) == text, text
    assert 1 not in ids.tolist(), f"UNK in {text!r}"  # UNK=1: never, thanks to byte fallback
  assert tok.encode("\n").tolist() != tok.encode(" ").tolist()
  assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "60", "--out",
                   str(tmp_path / "lossy"), "--sentencepiece-defaults"]) == 0
  lossy = load_tokenizer(str(tmp_path / "lossy.model"))
  assert lossy.decode(lossy.encode(ROUND_TRIP[0])) != ROUND_TRIP[0]  # the old defaults: layout lost
  assert 1 in lossy.encode("☃").tolist()


def test_missing_tokenizer_is_clear(tmp_path):
  with pytest.raises(DataError, match="not found; train one with `longctx tokenizer train`"):
    load_tokenizer(str(tmp_path / "nope.model"))


# ----------------------------------------------------------------------------- sources


def test_local_files_txt_jsonl_parquet(tmp_path):
  import pandas as pd  # ships with datasets

  (tmp_path / "a.txt").write_text("first document\nwith two lines")
  (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(5)))
  pd.DataFrame({"text": ["parquet one", "parquet two"]}).to_parquet(tmp_path / "c.parquet")
  cfg = DataConfig(source="files", paths=[str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")],
                   eval_fraction=0.2)
  train, held = build_sources(cfg, TOK)
  texts = {TOK.decode(src.get(0, i)["tokens"]) for src in (train, held) for i in range(src.num_docs)}
  assert texts == {"first document\nwith two lines", *(f"row {i}" for i in range(5)), "parquet one", "parquet two"}
  assert held.num_docs >= 1
  # Glob patterns expand (sorted), alone or beside plain paths; a pattern matching nothing is one clear line.
  globbed = DataConfig(source="files", paths=[str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")], eval_fraction=0.2)
  train, held = build_sources(globbed, TOK)
  assert train.num_docs + held.num_docs == 6
  with pytest.raises(DataError, match=r"pattern .*nothing_\*\.txt' matches no file"):
    build_sources(DataConfig(source="files", paths=[str(tmp_path / "nothing_*.txt")]), TOK)


def test_any_text_file_is_a_document_compressed_or_not(tmp_path):
  """.tex, .md, .py, .rst, no extension: one UTF-8 document each; .gz / .bz2 / .xz / .zst compressed text and
  rows too. Before: `data file 'paper.tex' has an unsupported type '.tex'`."""
  import bz2
  import gzip
  import lzma

  import zstandard

  plain = {"paper.tex": "\\section{A}\nText.", "notes.md": "# Notes\n\n* one", "tool.py": "print(1)\n",
           "guide.rst": "Guide\n=====", "README": "no extension", "table.csv": "a,b\n1,2"}
  for name, text in plain.items():
    (tmp_path / name).write_text(text)
  packed = {"book.txt.gz": (gzip.compress, "gzip book"), "paper.tex.bz2": (bz2.compress, "bz2 paper"),
            "notes.md.xz": (lzma.compress, "xz notes"), "book.txt.zst": (zstandard.ZstdCompressor().compress, "zst")}
  for name, (pack, text) in packed.items():
    (tmp_path / name).write_bytes(pack(text.encode()))
  (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(b'{"text": "row a"}\n{"text": "row b"}\n'))
  names = [*plain, *packed, "rows.jsonl.gz"]
  cfg = DataConfig(source="files", paths=[str(tmp_path / n) for n in names], eval_fraction=0.3)
  train, held = build_sources(cfg, TOK)
  texts = {TOK.decode(src.get(0, i)["tokens"]) for src in (train, held) for i in range(src.num_docs)}
  assert texts == {*plain.values(), *(t for _, t in packed.values()), "row a", "row b"}
  listed = sorted(train.names + held.names)
  assert listed == sorted([str(tmp_path / n) for n in [*plain, *packed]] +
                          [f"{tmp_path / 'rows.jsonl.gz'} row {r}" for r in (0, 1)])


def test_an_unreadable_file_among_many_is_named(tmp_path):
  """A latin-1 .tex among 69 good files: one short line naming that file and the byte. Before: a 2,549-
  character line listing all 70 paths. `data.skip_unreadable=true` skips it with one counted warning."""
  for i in range(69):
    (tmp_path / f"good{i:02d}.tex").write_text(f"\\section{{Part {i}}} text {i}")
  (tmp_path / "latin1.tex").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
  cfg = DataConfig(source="files", paths=[str(tmp_path / "*.tex")])
  with pytest.raises(DataError) as info:
    build_sources(cfg, TOK)
  msg = str(info.value)
  assert msg.startswith(f"data file {str(tmp_path / 'latin1.tex')!r} is not UTF-8 text (byte 3 is 0xe9)"), msg
  assert "\n" not in msg and len(msg) < 300 and "good00" not in msg, msg
  assert "data.skip_unreadable=true" in msg
  warnings = []
  train, held = build_sources(DataConfig(source="files", paths=cfg.paths, skip_unreadable=True), TOK,
                              warn=warnings.append)
  assert train.num_docs + held.num_docs == 69
  assert len(warnings) == 1 and warnings[0].startswith("warning: skipped 1 unreadable data file(s)")
  assert "latin1.tex" in warnings[0]
  (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{not json\n')
  with pytest.raises(DataError, match=r"rows.jsonl' line 3 is not JSON"):
    build_sources(DataConfig(source="files", paths=[str(tmp_path / "rows.jsonl")]), TOK)


def test_hub_offline_or_unreachable_is_one_line_at_once(monkeypatch):
  """Before: 27 s and 22 duplicated retry warnings before the error line. Now the hub is asked once, with a
  short timeout; HF_HUB_OFFLINE answers without asking; `datasets` is never reached."""
  import datasets

  def never(*args, **kwargs):
    raise AssertionError("datasets.load_dataset was called: it would retry for half a minute")

  monkeypatch.setattr(datasets, "load_dataset", never)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(DataError, match="HF_HUB_OFFLINE is set, so hub dataset 'deepmind/pg19' cannot be streamed"):
    build_sources(DataConfig(source="hub", hub_name="deepmind/pg19"), TOK)
  monkeypatch.delenv("HF_HUB_OFFLINE")
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
  with pytest.raises(DataError, match=r"cannot reach the Hugging Face hub at http://127.0.0.1:9 to stream dataset"):
    build_sources(DataConfig(source="hub", hub_name="deepmind/pg19"), TOK)


def test_hub_source_streams_a_local_directory(tmp_path):
  """The hub loader runs the same streaming code path on a local dataset directory."""
  (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"book": f"book {i} " * 20}) for i in range(6)))
  (tmp_path / "validation.jsonl").write_text(json.dumps({"book": "held out"}))
  cfg = DataConfig(source="hub", hub_name=str(tmp_path), text_field="book")
  train, held = build_sources(cfg, TOK)
  assert not train.random_access
  docs = [TOK.decode(d["tokens"]) for d in train.documents(0)]
  assert sorted(docs) == sorted(f"book {i} " * 20 for i in range(6))
  assert [TOK.decode(d["tokens"]) for d in held.documents(0)] == ["held out"]
  lb = LaneBatcher(train, num_lanes=2, seg_len=32, segments_per_step=1, pad_id=TOK.pad_id)
  assert next(lb)["tokens"].shape == (1, 2, 32)


def test_bad_sources_are_clear(tmp_path):
  with pytest.raises(DataError, match="data file .*missing.txt' not found"):
    build_sources(DataConfig(source="files", paths=[str(tmp_path / "missing.txt")]), TOK)
  (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x"}))
  with pytest.raises(DataError, match="field 'text' not in .*its fields are \\['body'\\]"):
    build_sources(DataConfig(source="files", paths=[str(tmp_path / "rows.jsonl")]), TOK)
  (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}))
  with pytest.raises(DataError, match="contain no non-empty documents"):
    build_sources(DataConfig(source="files", paths=[str(tmp_path / "empty.jsonl")]), TOK)
  with pytest.raises(ConfigError, match="data.task='nope'.*not in"):
    build_sources(DataConfig(source="synthetic", task="nope"), TOK)


def test_stdlib_source_is_deterministic():
  a, held = build_sources(DataConfig(source="stdlib"), TOK)
  b, _ = build_sources(DataConfig(source="stdlib"), TOK)
  assert a.num_docs > 100 and held.num_docs >= 1
  np.testing.assert_array_equal(a.get(0, 5)["tokens"], b.get(0, 5)["tokens"])


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_synthetic_answers_correct_by_construction(task):
  for seed in range(25):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(200, 2000))
    doc, meta = synthetic.make_example(task, rng=rng, length_tokens=length, tokenizer=TOK)
    assert synthetic.check_answer(task, meta["prompt"]) == meta["answers"]  # answers left out of the text
    # The scored spans hold exactly the answers; the loss mask holds exactly answers + tails (+ EOS).
    assert [TOK.decode(doc["tokens"][s:e]).strip() for s, e in meta["answer_spans"]] == meta["answers"]
    in_span = np.zeros(len(doc["tokens"]), bool)
    for s, e in meta["answer_spans"]:
      in_span[s:e] = True
    assert np.all(doc["target_mask"][in_span])
    tails = TOK.decode(doc["tokens"][doc["target_mask"] & ~in_span][:-1])
    assert set(tails) == {"."} and doc["target_mask"][-1] and not doc["target_mask"][0]
    assert TOK.decode(doc["tokens"][1:-1]) == meta["text"]
    assert 0.6 * length < len(doc["tokens"]) < 1.4 * length + 40


def test_synthetic_task_parameters():
  for depth in (0.0, 0.5, 1.0):
    _, meta = synthetic.make_example("passkey", rng=np.random.default_rng(1), length_tokens=2000, tokenizer=TOK,
                                     depth=depth)
    at = meta["text"].index("The pass key is")
    assert abs(at / len(meta["text"]) - depth) < 0.1 and abs(meta["depth"] - depth) < 0.01
  _, meta = synthetic.make_example("mqar", rng=np.random.default_rng(1), length_tokens=2000, tokenizer=TOK,
                                   num_pairs=7)
  assert meta["num_pairs"] == 7 and len(meta["answers"]) == 7 == len(meta["answer_spans"])
  doc, _ = synthetic.make_example("qa1", rng=np.random.default_rng(1), length_tokens=300, tokenizer=TOK,
                                  prompt_loss_weight=0.25)
  np.testing.assert_array_equal(doc["loss_weight"], np.where(doc["target_mask"], 1.0, 0.25) * (np.arange(
      len(doc["tokens"])) > 0))


def test_qa2_needs_two_facts():
  text = ("Mary went to the office. John went to the garden. Mary picked up the milk. Filler. Mary went to the "
          "kitchen. John picked up the apple. John dropped the apple. John went to the hallway. Where is the milk?")
  person, objects = synthetic._simulate(text)
  assert person == {"Mary": "kitchen", "John": "hallway"}
  assert objects == {"milk": "kitchen", "apple": "garden"}
  assert synthetic.check_answer("qa2", text.replace("milk?", "apple? Answer:")) == ["garden"]


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_synthetic_deterministic(task):
  make = lambda: synthetic.make_example(task, rng=np.random.default_rng(11), length_tokens=500, tokenizer=TOK)[0]
  np.testing.assert_array_equal(make()["tokens"], make()["tokens"])


def test_synthetic_mixture_weights_by_repetition():
  """A task named twice in the mixture is drawn twice as often (counted from the generated text)."""
  from longctx.data.sources import SyntheticSource

  src = SyntheticSource("copy,copy,qa1", tokenizer=TOK, length=64, num_docs=600, seed=0)
  texts = [TOK.decode([int(t) for t in src.get(0, i)["tokens"]]) for i in range(600)]
  copies = sum("Repeat the code:" in t for t in texts)
  assert copies + sum("Answer:" in t for t in texts) == 600
  assert 0.6 < copies / 600 < 0.73
