"""Tokenizer-independent quality: bits per byte on fixed held-out text, measured honestly.

Models with different tokenizers can only be compared per byte of text, not per token. Every window starts
from the tokenizer's BOS (or EOS when there is no BOS, as GPT-2-style models do) so that every text token is
scored.

A per-byte score is only fair if the model had to predict every byte. A tokenizer that maps text to `[UNK]`
or drops characters gets a flattering score (a model that predicts `[UNK]` 500 times "knows" the text), so
before scoring, the text is encoded and decoded and compared with the original:

* bytes lost: UTF-8 bytes of the original that decode(encode(text)) does not give back (a diff, so a changed
  character costs its own bytes, not the rest of the line);
* unknown tokens: ids equal to the tokenizer's unk id.

Above `MAX_LOST_FRACTION` of the bytes or `MAX_UNKNOWN_FRACTION` of the tokens the measurement is refused with
a one-line `TransplantError`; below, both figures are reported next to the score (`measure_bits_per_byte`).
Normalising tokenizers (NFKC, lower-casing, collapsed spaces) are scored the same way: bits are always divided
by the bytes of the *original* text, and what the normaliser changes counts as lost: each ligature or
full-width character NFKC folds costs its own bytes (a few on a page stay under the limit and are reported),
while folding case or collapsing whitespace usually loses more than 0.1% and is refused, since such a model
never has to predict those bytes. Empty text is an error, not a score of 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from transplant.errors import TransplantError, first_line

log = logging.getLogger(__name__)

MAX_LOST_FRACTION = 0.001  # of the text's bytes
MAX_UNKNOWN_FRACTION = 0.01  # of the tokens
_ANCHOR, _WINDOW = 8, 1024  # resynchronisation after a mismatch (see `_unmatched`)
LARGE_MODEL_PARAMETERS = 100_000_000  # from here on, `model_measure` shows progress bars


@dataclass(frozen=True)
class Fidelity:
    """How faithfully a tokenizer reproduces a text: bytes lost in the round trip, unknown tokens."""

    text_bytes: int
    lost_bytes: int
    tokens: int
    unknown_tokens: int

    @property
    def lost_fraction(self) -> float:
        return self.lost_bytes / max(self.text_bytes, 1)

    @property
    def unknown_fraction(self) -> float:
        return self.unknown_tokens / max(self.tokens, 1)

    @property
    def acceptable(self) -> bool:
        return self.lost_fraction <= MAX_LOST_FRACTION and self.unknown_fraction <= MAX_UNKNOWN_FRACTION

    def __add__(self, other: Fidelity) -> Fidelity:
        return Fidelity(self.text_bytes + other.text_bytes, self.lost_bytes + other.lost_bytes,
                        self.tokens + other.tokens, self.unknown_tokens + other.unknown_tokens)

    def describe(self) -> str:
        return (f"{self.lost_fraction:.2%} of {self.text_bytes} bytes lost in decode(encode(text)), "
                f"{self.unknown_fraction:.2%} of {self.tokens} tokens unknown")


@dataclass(frozen=True)
class BitsPerByte:
    """A bits-per-byte score with the round-trip figures it was measured under."""

    bpb: float
    fidelity: Fidelity

    def as_dict(self) -> dict[str, float]:
        return {"bits_per_byte": self.bpb, "bytes_lost": self.fidelity.lost_fraction,
                "unknown_tokens": self.fidelity.unknown_fraction}


def _common_prefix(a: bytes, b: bytes, i: int, j: int) -> int:
    """Length of the common run of a[i:] and b[j:], compared in growing then shrinking slices (C speed)."""
    n, step, limit = 0, 64, min(len(a) - i, len(b) - j)
    while n < limit:
        size = min(step, limit - n)
        if a[i + n : i + n + size] == b[j + n : j + n + size]:
            n, step = n + size, step * 2
        elif size == 1:
            break
        else:
            step = max(1, size // 2)
    return n


def _unmatched(original: bytes, back: bytes) -> int:
    """Bytes of `original` outside an in-order matching with `back`: equal runs are matched, and after a
    mismatch the next `_ANCHOR` bytes of the original are looked up within `_WINDOW` bytes of `back` to
    resynchronise. Matched runs form a common subsequence, so this is an upper bound on the bytes lost (exact
    for isolated changes such as a folded ligature), found in near-linear time (difflib is quadratic on
    repetitive text)."""
    i = j = lost = 0
    while i < len(original):
        run = _common_prefix(original, back, i, j)
        i, j = i + run, j + run
        if i >= len(original):
            break
        if j >= len(back):
            return lost + len(original) - i
        for skip in range(min(_WINDOW, len(original) - i)):
            anchor = original[i + skip : i + skip + _ANCHOR]
            found = back.find(anchor, j, j + _WINDOW + len(anchor))
            if found >= 0:
                break
        else:
            skip, found = min(_WINDOW, len(original) - i), j  # nothing nearby matches: these bytes are lost
        lost, i, j = lost + skip, i + skip, found
    return lost


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def tokenizer_fidelity(tokenizer, text: str, ids: list[int] | None = None) -> Fidelity:
    """Round-trip `text` through `tokenizer` (HF tokenizer) and count lost bytes and unknown tokens."""
    ids = _encode(tokenizer, text) if ids is None else ids
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    original = text.encode("utf-8")
    lost = 0 if back == text else _unmatched(original, back.encode("utf-8"))
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = sum(1 for i in ids if i == unk) if unk is not None else 0
    return Fidelity(len(original), lost, len(ids), unknown)


def check_fidelity(fidelity: Fidelity, what: str) -> None:
    """Refuse to score a text the tokenizer does not reproduce: its bits per byte would flatter it."""
    if not fidelity.acceptable:
        raise TransplantError(
            f"{what}: the tokenizer does not reproduce the text ({fidelity.describe()}), so bits per byte "
            "would flatter it and is not measured; use a tokenizer that round-trips the text (byte fallback, "
            "no [UNK])"
        )


def _start_token(tokenizer) -> int | None:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


@torch.no_grad()
def sum_nll(model, tokenizer, text: str, *, max_length: int = 1024, batch_size: int | None = None,
            ids: list[int] | None = None, progress: bool = False) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of `text`'s tokens (`ids` when already encoded) and their count;
    `progress` shows a bar over the windows (on a terminal)."""
    if batch_size is None:  # keep the [batch, length, vocab] logits near 1 GB (Gemma's vocab is 262k)
        batch_size = max(1, int(2.5e8 // (max_length * model.config.vocab_size)))
    ids = _encode(tokenizer, text) if ids is None else ids
    start = _start_token(tokenizer)
    window = max_length - 1 if start is not None else max_length
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="scoring windows", unit="window", leave=False,
               disable=None if progress else True)
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        bar.update(len(batch))
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
    bar.close()
    if start is None:  # the first token of each window had no context: not scored, say so once
        log.warning("tokenizer has no BOS/EOS: the first token of each window is not scored")
    return total, count


def measure_bits_per_byte(model, tokenizer, texts: str | Iterable[str], *, max_length: int = 1024,
                          batch_size: int | None = None, progress: bool = False,
                          what: str = "text") -> BitsPerByte:
    """Bits per UTF-8 byte of `texts` (lower is better) and the round-trip figures; refuses empty text and
    text the tokenizer does not reproduce (module docstring)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not t for t in texts):
        raise TransplantError(f"{what} is empty: there is nothing to measure; pass a non-empty text")
    total_nats, fidelity = 0.0, Fidelity(0, 0, 0, 0)
    for text in tqdm(texts, desc="bits/byte", disable=None if progress else True):
        ids = _encode(tokenizer, text)
        one = tokenizer_fidelity(tokenizer, text, ids)
        check_fidelity(one, what)
        fidelity = fidelity + one
        nats, _ = sum_nll(model, tokenizer, text, max_length=max_length, batch_size=batch_size, ids=ids,
                          progress=progress)
        total_nats += nats
    if fidelity.lost_bytes or fidelity.unknown_tokens:
        log.warning("%s: %s (within the limits; the score counts every original byte)", what,
                    fidelity.describe())
    return BitsPerByte(total_nats / math.log(2) / fidelity.text_bytes, fidelity)


def bits_per_byte(model, tokenizer, texts: str | Iterable[str], *, max_length: int = 1024,
                  batch_size: int | None = None, progress: bool = False) -> float:
    """Bits per UTF-8 byte of `texts` under `model` with `tokenizer`; see `measure_bits_per_byte`."""
    return measure_bits_per_byte(model, tokenizer, texts, max_length=max_length, batch_size=batch_size,
                                 progress=progress).bpb


def load_for_eval(model_dir, device: str = "cpu", dtype: torch.dtype | None = None,
                  trust_remote_code: bool = False):
    """Stock transformers loading of a model dir and its tokenizer (what our users will do).

    The weights are validated first (a truncated or damaged file is a one-line error, not a traceback from
    deep inside transformers). `trust_remote_code` runs the dir's own modelling code: only when the user
    passed it (the transplant command forwards its flag)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transplant.io import safetensors

    for path in safetensors.model_weight_files(Path(model_dir)):
        safetensors.read_header(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types for a damaged or missing tokenizer
        raise TransplantError(f"cannot load the tokenizer of {model_dir} ({first_line(err)}); pass a model "
                              "dir saved with its tokenizer") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32,
                                                     trust_remote_code=trust_remote_code)
    except Exception as err:  # config/weight mismatches surface as ValueError, OSError, RuntimeError, ...
        raise TransplantError(f"cannot load the model in {model_dir} ({first_line(err)}); re-download or "
                              "re-save it") from err
    return model.to(device).eval(), tokenizer


def model_measure(model_dir, texts: str | Iterable[str], *, device: str = "cpu", max_length: int = 1024,
                  dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> BitsPerByte:
    """`measure_bits_per_byte` of a model dir (loaded as `load_for_eval` does), with progress bars (on a
    terminal) when the model is large enough for scoring to take a while."""
    model, tokenizer = load_for_eval(model_dir, device=device, dtype=dtype,
                                     trust_remote_code=trust_remote_code)
    large = sum(p.numel() for p in model.parameters()) >= LARGE_MODEL_PARAMETERS
    return measure_bits_per_byte(model, tokenizer, texts, max_length=max_length,
                                 what=f"text scored with {model_dir}", progress=large)


def model_bits_per_byte(model_dir, texts: str | Iterable[str], *, device: str = "cpu", max_length: int = 1024,
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> float:
    return model_measure(model_dir, texts, device=device, max_length=max_length, dtype=dtype,
                         trust_remote_code=trust_remote_code).bpb


def heldout_fidelity(stats: dict[str, Any], texts: Mapping[str, str], base_tokenizer,
                     new_tokenizer) -> list[str]:
    """Put the new tokenizer's round-trip figures on the held-out slices into `stats` (and a warning when it
    loses bytes or maps text to unknown tokens); return the slices both tokenizers reproduce, the only ones
    whose before/after bits per byte can be compared honestly."""
    comparable, total = [], Fidelity(0, 0, 0, 0)
    for name, text in texts.items():
        if not text:
            continue
        new = tokenizer_fidelity(new_tokenizer, text)
        total = total + new
        if new.acceptable and tokenizer_fidelity(base_tokenizer, text).acceptable:
            comparable.append(name)
    if not total.text_bytes:
        return comparable
    stats["new_tokenizer_bytes_lost"] = round(total.lost_fraction, 6)
    stats["new_tokenizer_unknown_tokens"] = round(total.unknown_fraction, 6)
    if total.lost_bytes or total.unknown_tokens:
        skipped = [n for n in texts if n not in comparable]
        stats["warning"] = (f"the new tokenizer does not reproduce the held-out text ({total.describe()})"
                            + (f"; bits per byte not compared on {', '.join(skipped)}" if skipped else ""))
        log.warning(stats["warning"])
    return comparable
