"""Synthetic long-context tasks, generated offline and deterministic by seed.

Every task is text (so any tokenizer works): a prompt of about `length_tokens`
tokens whose answer can only be given by remembering something far back.

  passkey  filler sentences with "The pass key is N. Remember it." at a chosen or random
           depth (landmark attention); ends "What is the pass key? The pass key is" -> " N".
  mqar     multi-query associative recall (Zoology): key:value pairs, then queries of
           earlier keys with power-law gaps among noise words; every value is an answer.
  copy     a random string, filler, then "Repeat the code:" -> the string.
  qa1      BABILong-style single supporting fact: bAbI-like moves ("Mary went to the
           kitchen.") scattered among filler; "Where is Mary?" -> her last location.
  qa2      BABILong-style two supporting facts: people pick up and drop objects and move;
           "Where is the football?" -> where its holder last went (or where it was dropped).

A document is built from pieces of three roles: prompt text, answer text (the
scored span) and tail text (the "." and EOS after an answer). The loss mask
covers answers and tails; prompt tokens get weight `prompt_loss_weight`
(0 = answer-only loss, as in Zoology / BABILong). `meta["answer_spans"]` gives
each answer's `[start, end)` token positions in `doc["tokens"]`, so accuracy is
exact match of the greedy (argmax) prediction over the span.

`check_answer(task, prompt)` re-derives the answers from the prompt text alone;
tests use it to prove every generated answer correct by construction.
"""

from __future__ import annotations

import re

import numpy as np

from longctx.config import TASKS, parse_tasks  # noqa: F401  (data.task's vocabulary lives with the config)
from longctx.data.document import Document, make_document
from longctx.errors import ConfigError

FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river flows past the old mill.", "A light wind moves the leaves.", "The clock on the wall ticks.",
    "Bread is baked early in the morning.", "The road bends toward the hills.",
    "Clouds drift slowly over the town.", "A cat sleeps by the warm stove.",
)
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("kitchen", "garden", "office", "bathroom", "hallway", "bedroom")
OBJECTS = ("football", "apple", "milk", "book")
VERBS = ("went to", "journeyed to", "moved to", "travelled to")
NOISE = ("and", "then", "so", "well", "now", "also")

# Chance level of exact-match accuracy for a model that knows the answer format but not the answer.
CHANCE = {"passkey": 1 / 90_000, "mqar": 1 / 90, "copy": 0.0, "qa1": 1 / len(PLACES), "qa2": 1 / len(PLACES)}


_ROLE_IDS = {"prompt": 0, "answer": 1, "tail": 2}


def check_task(task: str) -> None:
  parse_tasks(task)


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


def make_example(task: str, *, rng: np.random.Generator, length_tokens: int, tokenizer,
                 depth: float | None = None, num_pairs: int | None = None,
                 prompt_loss_weight: float = 0.0,
                 depth_range: tuple[float, float] | None = None) -> tuple[Document, dict]:
  """One document of about `length_tokens` tokens.

  Args:
    depth: passkey only: where the key sits, 0 = start of the filler, 1 = just
      before the question (default: uniform at random, in `depth_range` if given).
    num_pairs: mqar only: key-value pairs (default: grows with the length).
    prompt_loss_weight: loss weight of prompt tokens (answers and tails weigh 1).
  Returns:
    (document, meta) where meta holds "task", "answers", "answer_spans",
    "text" (with answers), "prompt" (answers left out) and task parameters.
  """
  check_task(task)
  if task not in _GENERATORS:
    raise ConfigError(f"make_example takes one task, got the mixture {task!r}")
  budget = max(64, int(length_tokens * _chars_per_token(tokenizer)))
  if task == "passkey" and depth is None and depth_range:
    depth = float(rng.uniform(*depth_range))
  kwargs = {"depth": depth} if task == "passkey" else {"num_pairs": num_pairs} if task == "mqar" else {}
  pieces, answers, params = _GENERATORS[task](rng, budget, **kwargs)
  ids, roles = [], []
  for text, role in pieces:
    if text:
      t = tokenizer.encode(text)
      ids.append(np.asarray(t, np.int32))
      roles.append(np.full(len(t), _ROLE_IDS[role], np.int8))
  body, role = np.concatenate(ids), np.concatenate(roles)
  doc = make_document(body, tokenizer, target_mask=role != _ROLE_IDS["prompt"])
  if prompt_loss_weight:
    weight = np.where(doc["target_mask"], 1.0, prompt_loss_weight).astype(np.float32)
    weight[0] = 0.0  # BOS is never predicted
    doc["loss_weight"] = weight
  # Answer spans in document positions (BOS shifts the body by one).
  is_answer = np.concatenate([[0], (role == _ROLE_IDS["answer"]).astype(np.int8), [0]])
  edges = np.flatnonzero(np.diff(is_answer))
  spans = [(int(s) + 1, int(e) + 1) for s, e in zip(edges[::2], edges[1::2])]
  meta = {"task": task, "answers": answers, "answer_spans": spans, **params,
          "text": "".join(t for t, _ in pieces), "prompt": "".join(t for t, r in pieces if r == "prompt")}
  return doc, meta


def _passkey(rng, budget, depth=None):
  key = str(int(rng.integers(10_000, 100_000)))
  filler = _filler(rng, budget - 120)
  at = int(rng.integers(0, len(filler) + 1)) if depth is None else int(round(float(depth) * len(filler)))
  sentences = filler[:at] + [f"The pass key is {key}. Remember it. {key} is the pass key."] + filler[at:]
  prompt = " ".join(sentences) + " What is the pass key? The pass key is"
  return ([(prompt, "prompt"), (f" {key}", "answer"), (".", "tail")], [key],
          {"depth": at / max(1, len(filler))})


def _mqar(rng, budget, num_pairs=None):
  letters = list("abcdefghijklmnopqrstuvwxyz")
  n = int(num_pairs or np.clip(budget // 60, 2, 64))
  keys = []
  while len(keys) < n:
    k = "".join(rng.choice(letters, 3))
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
    pieces += [((head if qi == 0 else "") + (" " + noise if noise else "") + f" {keys[idx]}:", "prompt"),
               (values[idx], "answer")]
    answers.append(values[idx])
  pieces.append((".", "tail"))
  return pieces, answers, {"num_pairs": n}


def _copy(rng, budget):
  code = "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"), int(rng.integers(8, 17))))
  filler = " ".join(_filler(rng, budget - 80))
  return [(f"Code: {code}. {filler} Repeat the code:", "prompt"), (f" {code}", "answer"), (".", "tail")], [code], {}


def _scatter(rng, facts: list[str], filler: list[str]) -> str:
  """Facts in their order, each at a random slot among the filler sentences."""
  slots = np.sort(rng.choice(len(filler) + 1, len(facts), replace=True))
  sentences, fi = [], 0
  for i in range(len(filler) + 1):
    while fi < len(facts) and slots[fi] == i:
      sentences.append(facts[fi])
      fi += 1
    if i < len(filler):
      sentences.append(filler[i])
  return " ".join(sentences)


def _move(rng, who: str) -> tuple[str, str]:
  place = PLACES[rng.integers(len(PLACES))]
  return f"{who} {VERBS[rng.integers(len(VERBS))]} the {place}.", place


def _qa1(rng, budget):
  filler = _filler(rng, budget - 60)
  n_facts = int(np.clip(len(filler) // 8, 2, 12))
  facts = [_move(rng, PEOPLE[rng.integers(len(PEOPLE))])[0] for _ in range(n_facts)]
  who = facts[int(rng.integers(n_facts))].split(" ")[0]
  story = _scatter(rng, facts, filler)
  answer = _simulate(story)[0][who]
  return [(story + f" Where is {who}? Answer:", "prompt"), (f" {answer}", "answer"), (".", "tail")], [answer], {}


def _qa2(rng, budget):
  """Two supporting facts: who holds the object, and where that person went last."""
  filler = _filler(rng, budget - 80)
  n_events = int(np.clip(len(filler) // 6, 4, 16))
  where: dict[str, str] = {}
  holder: dict[str, str] = {}
  facts = []
  while len(facts) < n_events:
    who = PEOPLE[rng.integers(len(PEOPLE))]
    held = [o for o, h in holder.items() if h == who]
    free = [o for o in OBJECTS if o not in holder]
    kind = rng.integers(3)
    if kind == 0 and who in where and free:
      obj = free[rng.integers(len(free))]
      holder[obj] = who
      facts.append(f"{who} picked up the {obj}.")
    elif kind == 1 and held:
      obj = held[rng.integers(len(held))]
      del holder[obj]
      facts.append(f"{who} dropped the {obj}.")
    else:
      fact, where[who] = _move(rng, who)
      facts.append(fact)
  story = _scatter(rng, facts, filler)
  _, located = _simulate(story)
  if not located:  # nobody picked anything up: end with one more pick-up
    who = next(p for p in PEOPLE if p in where)
    story += f" {who} picked up the {OBJECTS[0]}."
    _, located = _simulate(story)
  objs = sorted(located)
  obj = objs[int(rng.integers(len(objs)))]
  answer = located[obj]
  return [(story + f" Where is the {obj}? Answer:", "prompt"), (f" {answer}", "answer"), (".", "tail")], [answer], {}


_EVENT = re.compile(r"(Mary|John|Daniel|Sandra) (?:(?:went|journeyed|moved|travelled) to the (\w+)|"
                    r"picked up the (\w+)|dropped the (\w+))\.")


def _simulate(text: str) -> tuple[dict[str, str], dict[str, str]]:
  """Replay every event in `text`: (last place of each person, place of each object whose place is known)."""
  person: dict[str, str] = {}
  holder: dict[str, str] = {}
  dropped_at: dict[str, str] = {}
  for who, place, took, dropped in _EVENT.findall(text):
    if place:
      person[who] = place
    elif took:
      holder[took] = who
      dropped_at.pop(took, None)
    elif holder.pop(dropped, None) is not None and who in person:
      dropped_at[dropped] = person[who]
  objects = dict(dropped_at)
  objects.update({o: person[h] for o, h in holder.items() if h in person})
  return person, objects


def check_answer(task: str, text: str) -> list[str]:
  """Re-derive the answers from the prompt text alone (the answers themselves removed)."""
  check_task(task)
  if task == "passkey":
    return [re.search(r"The pass key is (\d+)\. Remember it\.", text).group(1)]
  if task == "copy":
    return [re.match(r"Code: (\w+)\.", text).group(1)]
  if task == "qa1":
    who = re.search(r"Where is (\w+)\? Answer:", text).group(1)
    return [_simulate(text)[0][who]]
  if task == "qa2":
    obj = re.search(r"Where is the (\w+)\? Answer:", text).group(1)
    return [_simulate(text)[1][obj]]
  head, queries = text.split(" queries:", 1)
  table = dict(pair.split(":") for pair in head[len("pairs: "):].split(" "))
  return [table[k] for k in re.findall(r"([a-z]{3}):", queries)]


_GENERATORS = {"passkey": _passkey, "mqar": _mqar, "copy": _copy, "qa1": _qa1, "qa2": _qa2}
