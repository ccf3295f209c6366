"""Diverse training tokenizers for the hypernetwork.

ZeTT's point is that a hypernetwork trained on one tokenizer only learns that tokenizer; it must see many, and
ZeTT draws each one from the statistics of the very text it is then trained on. We count the words of a text
block, then every substring of every word (weighted by the word's count). A sampled tokenizer is a noisy top-k
of those substrings (log count + Gumbel noise · `noise`), of a random size, plus all 256 single bytes so every
text is encodable, turned into an in-memory `tokenizers` Unigram model over a byte-level pre-tokenizer
(scores = log relative frequency). Sampling one takes well under a second.

Pre-tokenization decides which token *shapes* exist at all, so each sampled tokenizer also draws a style from
`PRETOKENIZERS`: `gpt2` (a space joins the following word; punctuation and newlines stay apart) or `gpt4` (the
cl100k family that Llama 3, Qwen and tekken use: one non-letter may lead a word, `(message`, `=None`, and
punctuation takes the newlines after it, `:\n`, `):\n`). Trained on `gpt2` alone, the hypernetwork never saw
the second kind, which are ~90% of the new-token occurrences when Llama 3 / Qwen / tekken code is read with a
Gemma-3 base (bench/RESULTS.md, "Why the Gemma-3 hypernetwork lost code").

Memory is bounded by the block, not the corpus: counts are only ever taken over a bounded text (one training
block, `block_bytes`, or one bounded sample of the stream for `sampler: corpus`), ~60k distinct substrings per
MB of English. Real tokenizers (`Vocab`s) can be mixed in.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from transplant.tokenizers.formats import byte_level_string
from transplant.tokenizers.vocab import TokenKind, Vocab

WORD = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+| ?_+")
# style -> (Python regex that cuts words for counting, Oniguruma regex the sampled tokenizer splits with, or
# None for ByteLevel's own GPT-2 regex); they agree on ASCII text (Python's `re` has no \p{L}: `[^\W\d_]` is a
# letter, `[^\W_]` a letter or digit).
PRETOKENIZERS = {
    "gpt2": (WORD, None),  # what every hypernetwork before the gpt4 style was trained with
    "gpt4": (re.compile(r"(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}| "
                        r"?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
             r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
MAX_WORD_BYTES = 64  # longer "words" (base64, URLs, long runs of symbols) contribute only their first bytes


@dataclass
class TrainTokenizer:
    """What training needs from a tokenizer: its name, the bytes of each id, and batch encoding."""

    name: str
    token_bytes: list[bytes]
    encode_batch: Callable[[list[str]], list[list[int]]]

    def __len__(self) -> int:
        return len(self.token_bytes)


def substring_counts(text: str, max_len: int = 16, styles: tuple[str, ...] = ("gpt2",)) -> Counter:
    """Counts of every substring (2..max_len bytes) of every pre-tokenized word of `text`, as UTF-8 bytes, the
    words cut by each of `styles` (keys of PRETOKENIZERS) in turn.

    Call it on bounded text (a training block): its size is O(distinct words · MAX_WORD_BYTES · max_len)."""
    words: Counter = Counter()
    for style in styles:
        words.update(PRETOKENIZERS[style][0].findall(text))
    counts: Counter = Counter()
    for word, freq in words.items():
        data = word.encode("utf-8")[:MAX_WORD_BYTES]
        for start in range(len(data)):
            for end in range(start + 2, min(len(data), start + max_len) + 1):
                counts[data[start:end]] += freq
    return counts


class TokenizerSampler:
    """Draws random Unigram tokenizers from the substring statistics of one (bounded) text, and real
    tokenizers if given. Training builds one per text block (`sampler: batch`) or one for the run (`sampler:
    corpus`)."""

    def __init__(self, text: str | Counter, *, size_range: tuple[int, int] = (4000, 32000),
                 noise: float = 1.0, min_count: int = 2, max_len: int = 16,
                 real: list[Vocab | TrainTokenizer] | None = None, real_prob: float = 0.0, seed: int = 0,
                 styles: tuple[str, ...] = ("gpt2",)):
        unknown = [style for style in styles if style not in PRETOKENIZERS]
        if unknown or not styles:
            raise ValueError(f"pre-tokenizer styles {unknown or '[]'} unknown; use some of "
                             f"{sorted(PRETOKENIZERS)}")
        self.styles = tuple(styles)
        counts = substring_counts(text, max_len, self.styles) if isinstance(text, str) else text
        self.candidates = [(piece, count) for piece, count in counts.most_common() if count >= min_count]
        self.log_counts = torch.tensor([math.log(count) for _, count in self.candidates], dtype=torch.float64)
        self.size_range = size_range
        self.noise = noise
        self.real = [r if isinstance(r, TrainTokenizer) else real_tokenizer(r) for r in (real or [])]
        self.real_prob = real_prob
        self.rng = random.Random(seed)

    def sample(self) -> TrainTokenizer:
        if self.real and self.rng.random() < self.real_prob:
            return self.rng.choice(self.real)
        low, high = self.size_range
        size = int(math.exp(self.rng.uniform(math.log(low), math.log(high))))
        return self.sample_unigram(size)

    def sample_unigram(self, size: int) -> TrainTokenizer:
        style = self.styles[0] if len(self.styles) == 1 else self.rng.choice(self.styles)
        gen = torch.Generator().manual_seed(self.rng.getrandbits(62))
        uniform = torch.rand(len(self.log_counts), generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        keys = self.log_counts - self.noise * torch.log(-torch.log(uniform))
        k = min(max(0, size - 256), len(self.candidates))
        order = torch.topk(keys, k).indices.tolist() if k else []
        chosen = [self.candidates[i] for i in order]
        total = sum(count for _, count in chosen) or 1
        pieces = [bytes([b]) for b in range(256)] + [piece for piece, _ in chosen]
        scores = [-20.0] * 256 + [math.log(count / total) for _, count in chosen]
        return build_unigram(pieces, scores, name=f"unigram-{style}-{len(pieces)}", style=style)


def build_unigram(pieces: list[bytes], scores: list[float], name: str = "unigram", style: str = "gpt2"
                  ) -> TrainTokenizer:
    """An in-memory byte-level Unigram tokenizer that splits words by `style` (a PRETOKENIZERS key); id 0 is
    `<unk>` (never produced: all bytes are pieces)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = [("<unk>", -100.0)] + [(byte_level_string(p), s) for p, s in zip(pieces, scores)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    split = PRETOKENIZERS[style][1]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    token_bytes = [b""] + list(pieces)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]

    return TrainTokenizer(name, token_bytes, encode_batch)


def real_tokenizer(vocab: Vocab) -> TrainTokenizer:
    """A real tokenizer for training; specials get no bytes (they are never predicted)."""
    backend = getattr(vocab.tokenizer, "backend_tokenizer", None)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        if backend is not None:
            return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
        return [vocab.encode(t) for t in texts]

    token_bytes = [b if kind is not TokenKind.SPECIAL else b""
                   for b, kind in zip(vocab.token_bytes, vocab.kinds)]
    return TrainTokenizer(vocab.name or "real", token_bytes, encode_batch)
