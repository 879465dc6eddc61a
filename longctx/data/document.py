"""What every source yields and the lanes pack: one document.

A document is `{"tokens": int32 [n], "target_mask": bool [n]}` with tokens =
[BOS] + body + [EOS]; `target_mask[i]` says whether token i is a prediction
target (predicted from the tokens before it); `target_mask[0]` is False. An
optional `loss_weight` float32 [n] replaces the mask's 0/1 loss weights.

Its own module, below the sources and the synthetic tasks, so that neither imports the other for it.
"""

from __future__ import annotations

import numpy as np

Document = dict[str, np.ndarray]


def make_document(body: np.ndarray, tokenizer, *, target_mask: np.ndarray | None = None) -> Document:
  """Wrap token ids `[n]` as [BOS] + body + [EOS]; every token after BOS is a target unless
  `target_mask [n]` (for the body) says otherwise. EOS is a target iff the body's last token is."""
  body = np.asarray(body, np.int32)
  tokens = np.concatenate([[tokenizer.bos_id], body, [tokenizer.eos_id]]).astype(np.int32)
  if target_mask is None:
    mask = np.ones(tokens.shape, bool)
  else:
    tm = np.asarray(target_mask, bool)
    mask = np.concatenate([[False], tm, [tm[-1] if len(tm) else True]])
  mask[0] = False
  return {"tokens": tokens, "target_mask": mask}
