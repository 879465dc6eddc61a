"""Synthetic long-context tasks, generated offline and deterministic by seed.

Every task is text (so any tokenizer works): a prompt of about `length_tokens`
tokens whose answer can only be given by remembering something far back.
The document's `target_mask` covers only the answer tokens (and the EOS after
them), so the loss measures recall, not filler modelling.

  passkey  filler sentences with "The pass key is N. Remember it." at a random depth
           (landmark attention); ends "What is the pass key? The pass key is" -> " N".
  mqar     multi-query associative recall (Zoology): key:value pairs, then queries of
           earlier keys with power-law gaps among noise words; every answer value is a target.
  copy     a random string, filler, then "Repeat the code:" -> the string.
  qa1      BABILong-style single supporting fact: bAbI-like moves ("Mary went to the
           kitchen.") scattered among filler; "Where is Mary?" -> her last location.

`check_answer(task, text)` re-derives the answers from the prompt text alone;
tests use it to prove every generated answer correct by construction.
"""

from __future__ import annotations

import re

import numpy as np

from longctx.data.sources import Document, make_document
from longctx.errors import ConfigError

TASKS = ("passkey", "mqar", "copy", "qa1")

FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river flows past the old mill.", "A light wind moves the leaves.", "The clock on the wall ticks.",
    "Bread is baked early in the morning.", "The road bends toward the hills.",
    "Clouds drift slowly over the town.", "A cat sleeps by the warm stove.",
)
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("kitchen", "garden", "office", "bathroom", "hallway", "bedroom")
VERBS = ("went to", "journeyed to", "moved to", "travelled to")
NOISE = ("and", "then", "so", "well", "now", "also")


def check_task(task: str) -> None:
  if task not in TASKS:
    raise ConfigError(f"data.task={task!r} is not one of {TASKS}")


def _filler(rng: np.random.Generator, n_chars: int) -> list[str]:
  out, total = [], 0
  while total < n_chars:
    s = FILLER[rng.integers(len(FILLER))]
    out.append(s)
    total += len(s) + 1
  return out


def _chars_per_token(tokenizer) -> float:
  sample = " ".join(FILLER)
  return len(sample) / max(1, len(tokenizer.encode(sample)))


def make_example(task: str, *, rng: np.random.Generator, length_tokens: int, tokenizer) -> tuple[Document, dict]:
  """One document of about `length_tokens` tokens; returns (document, meta with 'answers')."""
  check_task(task)
  budget = max(64, int(length_tokens * _chars_per_token(tokenizer)))
  prompt, answers = _GENERATORS[task](rng, budget)
  # prompt ends where the (last) answer starts; answers are spliced in as (prompt piece, answer) pairs.
  bodies, masks = [], []
  for piece, answer in prompt:
    if piece:
      ids = tokenizer.encode(piece)
      bodies.append(ids)
      masks.append(np.zeros(len(ids), bool))
    if answer:
      ids = tokenizer.encode(answer)
      bodies.append(ids)
      masks.append(np.ones(len(ids), bool))
  body = np.concatenate(bodies).astype(np.int32)
  mask = np.concatenate(masks)
  meta = {"task": task, "answers": answers, "text": "".join(p + a for p, a in prompt),
          "prompt": "".join(p for p, _ in prompt)}  # the text with every answer left out
  return make_document(body, tokenizer, target_mask=mask), meta


def _passkey(rng, budget):
  key = str(int(rng.integers(10_000, 100_000)))
  filler = _filler(rng, budget - 120)
  depth = int(rng.integers(0, len(filler) + 1))
  sentences = filler[:depth] + [f"The pass key is {key}. Remember it. {key} is the pass key."] + filler[depth:]
  prompt = " ".join(sentences) + " What is the pass key? The pass key is"
  return [(prompt, f" {key}."), ], [key]


def _mqar(rng, budget, num_pairs: int | None = None):
  letters = "abcdefghijklmnopqrstuvwxyz"
  n = num_pairs or int(np.clip(budget // 60, 2, 64))
  keys = []
  while len(keys) < n:
    k = "".join(rng.choice(list(letters), 3))
    if k not in keys:
      keys.append(k)
  values = [str(int(v)) for v in rng.integers(10, 100, n)]
  head = "pairs: " + " ".join(f"{k}:{v}" for k, v in zip(keys, values)) + " queries:"
  pieces, answers = [], []
  order = rng.permutation(n)
  # Power-law gaps (Zoology): a few long stretches of noise, many short ones, filling the budget.
  gaps = rng.pareto(1.5, n) + 0.05
  gaps = gaps / gaps.sum() * max(0, budget - len(head) - 8 * n)
  for qi, idx in enumerate(order):
    words = int(gaps[qi] // 5)
    noise = " ".join(NOISE[rng.integers(len(NOISE))] for _ in range(words))
    piece = (head if qi == 0 else "") + (" " + noise if noise else "") + f" {keys[idx]}:"
    pieces.append((piece, values[idx]))
    answers.append(values[idx])
  return pieces, answers


def _copy(rng, budget):
  code = "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"), int(rng.integers(8, 17))))
  filler = " ".join(_filler(rng, budget - 80))
  return [(f"Code: {code}. {filler} Repeat the code:", f" {code}.")], [code]


def _qa1(rng, budget):
  filler = _filler(rng, budget - 60)
  n_facts = int(np.clip(len(filler) // 8, 2, 12))
  facts = [f"{PEOPLE[rng.integers(len(PEOPLE))]} {VERBS[rng.integers(len(VERBS))]} the "
           f"{PLACES[rng.integers(len(PLACES))]}." for _ in range(n_facts)]
  who = facts[int(rng.integers(n_facts))].split(" ")[0]
  slots = np.sort(rng.choice(len(filler) + 1, n_facts, replace=True))
  sentences, fi = [], 0
  for i in range(len(filler) + 1):
    while fi < n_facts and slots[fi] == i:
      sentences.append(facts[fi])
      fi += 1
    if i < len(filler):
      sentences.append(filler[i])
  answer = _last_location(" ".join(sentences), who)
  return [(" ".join(sentences) + f" Where is {who}? Answer:", f" {answer}.")], [answer]


_FACT = re.compile(r"(Mary|John|Daniel|Sandra) (?:went|journeyed|moved|travelled) to the (\w+)\.")


def _last_location(text: str, who: str) -> str:
  last = None
  for person, place in _FACT.findall(text):
    if person == who:
      last = place
  return last


def check_answer(task: str, text: str) -> list[str]:
  """Re-derive the answers from the prompt text alone (the answers themselves removed)."""
  check_task(task)
  if task == "passkey":
    return [re.search(r"The pass key is (\d+)\. Remember it\.", text).group(1)]
  if task == "copy":
    return [re.match(r"Code: (\w+)\.", text).group(1)]
  if task == "qa1":
    who = re.search(r"Where is (\w+)\? Answer:", text).group(1)
    return [_last_location(text, who)]
  head, queries = text.split(" queries:", 1)
  table = dict(pair.split(":") for pair in head[len("pairs: "):].split(" "))
  return [table[k] for k in re.findall(r"([a-z]{3}):", queries)]


_GENERATORS = {"passkey": _passkey, "mqar": _mqar, "copy": _copy, "qa1": _qa1}
