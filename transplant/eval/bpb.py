"""Tokenizer-independent quality: bits per byte on fixed held-out text.

Models with different tokenizers can only be compared per byte of text, not per token. Every window starts from
the tokenizer's BOS (or EOS when there is no BOS, as GPT-2-style models do) so that every text token is scored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _start_token(tokenizer) -> int | None:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


@torch.no_grad()
def sum_nll(model, tokenizer, text: str, *, max_length: int = 1024, batch_size: int | None = None) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of `text`'s tokens and the number of tokens scored."""
    if batch_size is None:  # keep the [batch, length, vocab] logits near 1 GB (Gemma's vocab is 262k)
        batch_size = max(1, int(2.5e8 // (max_length * model.config.vocab_size)))
    ids = tokenizer.encode(text, add_special_tokens=False)
    start = _start_token(tokenizer)
    window = max_length - 1 if start is not None else max_length
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        width = max(len(w) for w in batch) + (1 if start is not None else 0)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, w in enumerate(batch):
            seq = ([start] if start is not None else []) + w
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:]
        token_lp = logprobs.gather(-1, targets[..., None])[..., 0]
        valid = mask[:, 1:].bool()
        total -= float(token_lp[valid].sum())
        count += int(valid.sum())
    if start is None:  # the first token of each window had no context: not scored, say so once
        log.warning("tokenizer has no BOS/EOS: the first token of each window is not scored")
    return total, count


def bits_per_byte(model, tokenizer, texts: str | Iterable[str], *, max_length: int = 1024,
                  batch_size: int | None = None, progress: bool = False) -> float:
    """Bits per UTF-8 byte of `texts` under `model` with `tokenizer` (lower is better)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    total_nats, total_bytes = 0.0, 0
    for text in tqdm(texts, desc="bits/byte", disable=not progress):
        nats, _ = sum_nll(model, tokenizer, text, max_length=max_length, batch_size=batch_size)
        total_nats += nats
        total_bytes += len(text.encode("utf-8"))
    return total_nats / math.log(2) / max(total_bytes, 1)


def load_for_eval(model_dir, device: str = "cpu", dtype: torch.dtype | None = None):
    """Stock transformers loading of a model dir and its tokenizer (what our users will do)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32).to(device).eval()
    return model, tokenizer


def model_bits_per_byte(model_dir, texts: str | Iterable[str], *, device: str = "cpu", max_length: int = 1024,
                        dtype: torch.dtype | None = None) -> float:
    model, tokenizer = load_for_eval(model_dir, device=device, dtype=dtype)
    return bits_per_byte(model, tokenizer, texts, max_length=max_length)
