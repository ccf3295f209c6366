"""Auxiliary static token embeddings for FOCUS: fastText trained on text tokenized by the NEW tokenizer.

FOCUS (Dobler & de Melo, 2023) needs a space in which new and overlapping tokens can be compared without a
donor model. Tokenizing target text with the new tokenizer and treating every token as a "word" gives one:
fastText's CBOW places tokens that are used alike near each other, and its character n-grams give tokens that
never occur in the text a vector from their spelling. gensim's FastText is used (maintained, pure pip wheel).

A token's "word" is its exact bytes written with GPT-2's byte->character map (`b" the"` -> `"Ġthe"`): one
printable, whitespace-free string per byte sequence for every tokenizer family, so n-grams see real
characters.

The trained model is cached under `cache_dir()/focus/` per (tokenizer, corpus hash, settings) as a plain
`.npz` (no pickle), written to a temporary file and renamed into place, so a crash never leaves a half-written
model and concurrent runs never read one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from transplant.cache import cache_dir
from transplant.errors import TransplantError
from transplant.tokenizers.formats import byte_level_string
from transplant.tokenizers.vocab import TokenKind, Vocab

log = logging.getLogger(__name__)

# The bundled training texts used when the user gives no corpus (training regions only, never held-out text).
DEFAULT_TEXTS = ("english", "code", "german")

# How each requested token got its auxiliary vector (TokenVectors.source).
FROM_CORPUS, FROM_SUBWORDS, NO_VECTOR = 0, 1, 2


@dataclass(frozen=True)
class FastTextSettings:
    """Everything that changes the trained model (and therefore the cache key). Defaults follow the FOCUS
    code: CBOW (closer to a LM's objective than skip-gram), 10 negatives, n-grams of 3–6 characters."""

    dim: int = 100
    epochs: int = 5
    min_count: int = 3
    seed: int = 0
    window: int = 5
    negative: int = 10
    min_n: int = 3
    max_n: int = 6
    bucket: int = 2**17  # n-gram hash buckets: 2M (fastText's default) would be 800 MB at dim 100
    workers: int = 1  # one thread is reproducible for a seed; more are faster but order-dependent


@dataclass
class FastTextModel:
    """The trained model as arrays: what is needed to look up any token's vector, in or out of the corpus."""

    words: list[str]  # fastText's vocabulary: tokens seen at least min_count times
    word_vectors: np.ndarray  # [n_words, dim]: fastText's word vector (own vector and its n-grams, averaged)
    ngram_vectors: np.ndarray  # [bucket, dim]
    settings: FastTextSettings

    @cached_property
    def trained_buckets(self) -> np.ndarray:
        """Buckets some vocabulary word's n-grams hash to. Others keep their random init, so an out-of-corpus
        token's vector is built only from these (a vector of untrained buckets is noise, not spelling)."""
        from gensim.models.fasttext import ft_ngram_hashes

        s = self.settings
        hit = np.zeros(s.bucket, dtype=bool)
        for word in self.words:
            hit[ft_ngram_hashes(word, s.min_n, s.max_n, s.bucket)] = True
        return hit


def token_words(vocab: Vocab) -> list[str | None]:
    """Per id, the token's fastText word (its bytes through GPT-2's byte map); None for specials and
    empties."""
    return [byte_level_string(piece) if kind is not TokenKind.SPECIAL and piece else None
            for piece, kind in zip(vocab.token_bytes, vocab.kinds)]


def _line_prefix(data: bytes, n_bytes: int) -> bytes:
    """At most n_bytes of `data`, cut after a line break when there is one (a corpus line is never split)."""
    if len(data) <= n_bytes:
        return data
    cut = data[:n_bytes]
    end = cut.rfind(b"\n")
    return cut[: end + 1] if end >= 0 else cut


def corpus_text(path: str | None, max_bytes: int) -> tuple[str, str]:
    """(text, description): the user's corpus file, else the bundled training texts, at most `max_bytes`."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise TransplantError(f"--set corpus={path}: no such file; give a UTF-8 text file in the target "
                                  "language(s), or leave corpus unset to use the bundled training texts")
        with file.open("rb") as handle:  # a corpus may be many GB: read only what is used
            data = _line_prefix(handle.read(max_bytes + 4), max_bytes)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start < len(data) - 4:  # not just a character cut in half at the end
                raise TransplantError(f"--set corpus={path}: not UTF-8 text (byte {err.start}); convert "
                                      "it to UTF-8 first") from None
            text = data.decode("utf-8", errors="ignore")
        if not text.strip():
            raise TransplantError(f"--set corpus={path}: the file is empty; give a text file with real text")
        return text, f"{file} ({len(text.encode())} bytes)"
    from transplant.assets import texts

    share = max_bytes // len(DEFAULT_TEXTS)
    parts = [texts.train_text(name, share) for name in DEFAULT_TEXTS]
    text = "".join(parts)
    return text, f"bundled training texts {'+'.join(DEFAULT_TEXTS)} ({len(text.encode())} bytes)"


def chunks(text: str, chunk_bytes: int = 2048) -> list[str]:
    """Runs of whole lines of about `chunk_bytes`, newlines kept: newline tokens are vocabulary too, and a
    chunk stays far below gensim's 10,000-word sentence limit."""
    out, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chunk_bytes:
            out.append("".join(current))
            current, size = [], 0
    if current:
        out.append("".join(current))
    return out


def tokenized_sentences(vocab: Vocab, text: str, words: list[str | None]) -> list[list[str]]:
    """The corpus tokenized by `vocab`, each token replaced by its word (specials dropped)."""
    pieces = chunks(text)
    if getattr(vocab.tokenizer, "backend_tokenizer", None) is not None:  # a fast tokenizer: one batched call
        ids = vocab.tokenizer(pieces, add_special_tokens=False)["input_ids"]
    else:
        ids = [vocab.encode(piece) for piece in pieces]
    return [[words[i] for i in seq if words[i] is not None] for seq in ids]


def cache_key(vocab: Vocab, text: str, settings: FastTextSettings) -> str:
    """sha256 over the tokenizer (its serialized form and its token bytes), the corpus and the settings."""
    digest = hashlib.sha256()
    backend = getattr(vocab.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    for piece, kind in zip(vocab.token_bytes, vocab.kinds):
        digest.update(len(piece).to_bytes(4, "little") + piece + kind.value.encode())
    digest.update(hashlib.sha256(text.encode()).digest())
    digest.update(json.dumps(asdict(settings), sort_keys=True).encode())
    return digest.hexdigest()[:32]


def train_fasttext(sentences: list[list[str]], settings: FastTextSettings) -> FastTextModel:
    """Train gensim's FastText (CBOW) on the token sentences."""
    from gensim.models import FastText

    s = settings
    model = FastText(vector_size=s.dim, window=s.window, min_count=s.min_count, sg=0, negative=s.negative,
                     min_n=s.min_n, max_n=s.max_n, bucket=s.bucket, seed=s.seed, workers=s.workers)
    model.build_vocab(corpus_iterable=sentences)
    if not model.wv.index_to_key:
        raise TransplantError(f"the corpus has no token that occurs min_count={s.min_count} times; give a "
                              "larger corpus or a lower --set min_count")
    total = sum(len(sentence) for sentence in sentences)
    model.train(corpus_iterable=sentences, total_examples=len(sentences), total_words=total, epochs=s.epochs)
    wv = model.wv
    return FastTextModel(list(wv.index_to_key), np.asarray(wv.vectors, dtype=np.float32),
                         np.asarray(wv.vectors_ngrams, dtype=np.float32), settings)


def save_model(model: FastTextModel, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, words=np.array(model.words, dtype=str), word_vectors=model.word_vectors,
                     ngram_vectors=model.ngram_vectors, settings=np.array(json.dumps(asdict(model.settings))))
        # mkstemp makes it private; a cache entry is as readable as the rest of the cache
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_model(path: Path) -> FastTextModel:
    with np.load(path, allow_pickle=False) as data:
        settings = FastTextSettings(**json.loads(str(data["settings"])))
        return FastTextModel([str(w) for w in data["words"]], data["word_vectors"],
                             data["ngram_vectors"], settings)


def load_or_train(vocab: Vocab, text: str, settings: FastTextSettings) -> tuple[FastTextModel, dict]:
    """The cached model for (tokenizer, corpus, settings), trained and cached on first use; plus what happened
    (cache hit, corpus tokens, training seconds) for the report."""
    path = cache_dir() / "focus" / f"fasttext-{cache_key(vocab, text, settings)}.npz"
    if path.exists():
        try:
            model = load_model(path)
            log.info("focus: fastText model from cache %s (%d words)", path, len(model.words))
            return model, {"fasttext_cached": True, "fasttext_path": str(path)}
        except (OSError, ValueError, KeyError) as err:  # a damaged cache entry is rebuilt, not fatal
            log.warning("focus: ignoring unreadable cached model %s (%s)", path, err)
    started = time.perf_counter()
    sentences = tokenized_sentences(vocab, text, token_words(vocab))
    n_tokens = sum(len(sentence) for sentence in sentences)
    tokenize_s = time.perf_counter() - started
    log.info("focus: training fastText on %d tokens (dim=%d, epochs=%d, min_count=%d)", n_tokens,
             settings.dim, settings.epochs, settings.min_count)
    started = time.perf_counter()
    model = train_fasttext(sentences, settings)
    train_s = time.perf_counter() - started
    save_model(model, path)
    log.info("focus: fastText trained in %.1f s (%d words), cached at %s", train_s, len(model.words), path)
    return model, {"fasttext_cached": False, "fasttext_path": str(path), "corpus_tokens": n_tokens,
                   "tokenize_seconds": round(tokenize_s, 2), "fasttext_train_seconds": round(train_s, 2)}


def token_vectors(model: FastTextModel, words: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors [n, dim] float32, source [n] in {FROM_CORPUS, FROM_SUBWORDS, NO_VECTOR}) for the given words.

    A word in the fastText vocabulary gets its word vector. Any other gets the mean of its n-gram buckets that
    training touched (fastText's out-of-vocabulary vector, minus the untrained buckets); with none, NO_VECTOR
    and a zero row, for the caller's fallback.
    """
    from gensim.models.fasttext import ft_ngram_hashes

    s = model.settings
    index = {word: i for i, word in enumerate(model.words)}
    trained = model.trained_buckets
    out = np.zeros((len(words), model.word_vectors.shape[1]), dtype=np.float32)
    source = np.full(len(words), NO_VECTOR, dtype=np.int64)
    for row, word in enumerate(tqdm(words, desc="focus vectors", leave=False, disable=len(words) < 50_000)):
        if word is None:
            continue
        if word in index:
            out[row], source[row] = model.word_vectors[index[word]], FROM_CORPUS
            continue
        buckets = [b for b in ft_ngram_hashes(word, s.min_n, s.max_n, s.bucket) if trained[b]]
        if buckets:
            out[row], source[row] = model.ngram_vectors[buckets].mean(0), FROM_SUBWORDS
    return torch.from_numpy(out), torch.from_numpy(source)
