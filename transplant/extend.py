"""Vocabulary extension: add tokens to a BPE tokenizer without moving any existing id, then initialise them.

Tokens are added as BPE merges appended after every existing merge (lowest priority), so the tokenizer still
produces the new token through its normal algorithm and encodes consistently everywhere (an HF "added token",
by contrast, is cut out of the text before the model runs, even in the middle of other words). Learned from a
corpus, the n new tokens are the n most frequent adjacent pairs, merged one after another — BPE training
continued on the user's domain text. Given explicitly, a token gets the chain of merges its base segmentation
needs (the intermediate pieces become tokens too and are reported). New ids come after every existing id,
specials included.

Merges cannot cross the pre-tokenizer's cuts: byte-level BPE splits `<|tool_call|>` at `<|`, `tool`, `_call`,
`|>` before merging, so no merge chain makes it one token. Every given token is therefore checked to encode as
one id afterwards, and one that would not is a one-line error pointing at `special_tokens` (`--special`): a
special added token, matched whole before the model's algorithm runs and never split, for any tokenizer type.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from transplant.assets import load_vocab
from transplant.errors import TransplantError, shorten
from transplant.io.atomic import check_output, existing_paths
from transplant.io.surgery import estimate_output_bytes
from transplant.tokenizers.vocab import Vocab

log = logging.getLogger(__name__)

# A merge chain for a token of L symbols holds pieces of every length up to L: O(L²) bytes (a 100 kB token
# asked for 20 GB). Real tokens are words, markers and code pieces, ~100 bytes at the longest.
MAX_TOKEN_BYTES = 1024


def check_requested_tokens(tokens: list[str] | None, specials: list[str] | None) -> None:
    """Refuse an empty or over-long `--token`/`--special` before any work, naming it by a short prefix."""
    for flag, items in (("--token", tokens or []), ("--special", specials or [])):
        for token in items:
            if not token:
                example = " tokentransplant" if flag == "--token" else "<|tool_call|>"
                raise TransplantError(f"{flag}: the token is empty, which adds nothing; give its text, e.g. "
                                      f"{flag} {example!r}")
            size = len(token.encode("utf-8", "surrogatepass"))
            if size > MAX_TOKEN_BYTES:
                raise TransplantError(f"{flag} {shorten(token, 40)!r} is {size:,} bytes long; a token may "
                                      f"have at most {MAX_TOKEN_BYTES} bytes, pass a shorter one")


def _bpe_model(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise TransplantError(
            f"vocabulary extension needs a BPE tokenizer, this one is {model.get('type')!r}; "
            "transplant to a BPE tokenizer first or pass a BPE tokenizer"
        )
    return model


def corpus_words(backend, texts: list[str]) -> Counter:
    """Pre-tokenized words of the corpus with counts, in the model's own symbol alphabet (Ġ / ▁ / raw)."""
    counts: Counter = Counter()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        if backend.pre_tokenizer is not None:
            words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        else:  # SentencePiece-style: words start at each ▁
            words = re.findall(r"▁?[^▁]+|▁+", normalized)
        counts.update(words)
    return counts


def learn_merges(backend, texts: list[str], n: int, min_count: int = 2) -> list[tuple[str, str]]:
    """The n most frequent adjacent symbol pairs, merged greedily as BPE training would.

    Pair counts are updated incrementally (only words containing the merged pair are touched) and the best
    pair comes from a heap with lazy invalidation, so learning thousands of merges on megabytes of text takes
    seconds.
    """
    word_counts = corpus_words(backend, texts)
    words = [[t.value for t in backend.model.tokenize(w)] for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for idx, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[idx]
            where[pair].add(idx)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(merges) < n and heap:
        negative, pair = heapq.heappop(heap)
        if -negative != pair_counts.get(pair, 0):
            continue  # stale entry: the count changed after it was pushed
        if -negative < min_count:
            break
        merges.append(pair)
        merged = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for idx in where.pop(pair, ()):
            symbols = words[idx]
            for old in zip(symbols, symbols[1:]):
                pair_counts[old] -= freqs[idx]
                touched.add(old)
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[idx] = out
            for new in zip(out, out[1:]):
                pair_counts[new] += freqs[idx]
                where[new].add(idx)
                touched.add(new)
        for changed in touched:
            if pair_counts[changed] > 0 and changed != pair:
                heapq.heappush(heap, (-pair_counts[changed], changed))
        pair_counts.pop(pair, None)
    return merges


def merges_for_tokens(backend, tokens: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merge chains that make each given token a single BPE token."""
    merges: list[tuple[str, str]] = []
    for token in tokens:
        for word in corpus_words(backend, [token]):
            symbols = [t.value for t in backend.model.tokenize(word)]
            while len(symbols) > 1:
                merges.append((symbols[0], symbols[1]))
                symbols = [symbols[0] + symbols[1]] + symbols[2:]
    seen: set[tuple[str, str]] = set()
    return [m for m in merges if not (m in seen or seen.add(m))]


def extended_tokenizer_json(tokenizer_json: dict[str, Any],
                            merges: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """A copy of the tokenizer with the merges appended and their results given ids after every existing
    id."""
    data = json.loads(json.dumps(tokenizer_json))
    model = _bpe_model(data)
    vocab: dict[str, int] = model["vocab"]
    next_id = max([*vocab.values(), *[t["id"] for t in data.get("added_tokens", [])]]) + 1
    existing = {tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]}
    added: list[str] = []
    for left, right in merges:
        if (left, right) in existing:
            continue
        model["merges"].append([left, right] if not model["merges"] or isinstance(model["merges"][0], list)
                               else f"{left} {right}")
        existing.add((left, right))
        merged = left + right
        if merged not in vocab:
            vocab[merged] = next_id
            next_id += 1
            added.append(merged)
    return data, added


def _check_atomic(extended: Vocab, tokens: list[str]) -> None:
    """Every requested token must now encode as one id; a merge chain cannot cross the pre-tokenizer's cuts
    (spaces, punctuation), and a partial result would be a silent surprise."""
    for token in tokens:
        ids = extended.encode(token)
        if len(ids) != 1:
            pieces = extended.tokenizer.convert_ids_to_tokens(ids)
            shown = pieces[:6] + (["..."] if len(pieces) > 6 else [])
            special = f"--special {token!r}" if len(token) <= 60 else "--special"  # a long one: named once
            raise TransplantError(
                f"--token {shorten(token, 60)!r} would still be split into {len(ids)} tokens {shown} by this "
                "tokenizer's pre-tokenizer, which cuts text before any merge; add it as a special token "
                f"with {special} (never split) or choose a token without spaces or punctuation inside"
            )


def add_special_tokens(data: dict[str, Any], tokens: list[str]) -> tuple[dict, list[str]]:
    """`tokenizer.json` with `tokens` as special added tokens (never split, matched before the model runs),
    and the tokens that got new ids. One that is already special is left as it is.

    One that is already a normal token is refused: made special it would be aligned as a new token and lose
    its trained row (the alignment matches specials by their literal among the base's specials only)."""
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_str(json.dumps(data))
    already_special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    known = backend.get_vocab(with_added_tokens=True)
    for token in dict.fromkeys(tokens):
        if token in known and token not in already_special:
            raise TransplantError(f"--special {token!r} is already token {known[token]} of the vocabulary, "
                                  "as a normal token; making it special would lose its trained row, so use "
                                  "it as it is or choose a new name")
    fresh = [t for t in dict.fromkeys(tokens) if t not in known]
    skipped = [t for t in dict.fromkeys(tokens) if t in already_special]
    if skipped:
        log.info("already special tokens, left as they are: %s", ", ".join(skipped))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fresh])
    return json.loads(backend.to_str()), fresh


def extend_tokenizer(vocab: Vocab, *, new_tokens: list[str] | None = None, corpus: list[str] | None = None,
                     n: int | None = None,
                     special_tokens: list[str] | None = None) -> tuple[Vocab, list[str]]:
    """The extended Vocab (same ids for every existing token) and what was added: the model-alphabet strings
    of new merges, then the new special tokens.

    `new_tokens` (or `corpus` + `n`) become BPE merges, checked to encode as one token each; `special_tokens`
    become special added tokens (any tokenizer type), never split."""
    specials = list(special_tokens or [])
    check_requested_tokens(new_tokens, specials)
    if new_tokens is not None and corpus is not None or not (new_tokens or corpus is not None or specials):
        raise TransplantError("pass new_tokens=[...] or corpus=... (with n=...), and/or "
                              "special_tokens=[...], to extend a vocabulary")
    backend = vocab.tokenizer.backend_tokenizer
    data = json.loads(backend.to_str())
    added: list[str] = []
    if new_tokens or corpus is not None:
        _bpe_model(data)
        if corpus is not None:
            if not n or n < 1:
                raise TransplantError("corpus-based extension needs n >= 1 (how many tokens to learn)")
            merges = learn_merges(backend, corpus, n)
        else:
            merges = merges_for_tokens(backend, new_tokens)
        data, added = extended_tokenizer_json(data, merges)
    if specials:
        data, fresh = add_special_tokens(data, specials)
        added += fresh
    with tempfile.TemporaryDirectory() as tmp:
        vocab.save(tmp)  # tokenizer_config (specials, chat template) of the original
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
        extended = load_vocab(tmp)
    _check_atomic(extended, [*(new_tokens or []), *specials])
    return extended, added


def extend_vocab(model: str | Path, tokenizer: str | Path | None = None, *,
                 new_tokens: list[str] | None = None, corpus: str | list[str] | None = None,
                 n: int | None = None, method: str = "fvt", output: str | Path | None = None,
                 overwrite: bool = False, eval_texts: dict[str, str] | None = None,
                 options: dict[str, Any] | None = None, special_tokens: list[str] | None = None,
                 revision: str | None = None, trust_remote_code: bool = False):
    """Add tokens (given, or the n most useful ones learned from `corpus`) and special tokens
    (`special_tokens`, never split) and save a loadable model dir.

    The output is checked (writable, free space, `overwrite` only over an earlier output, never the model
    itself) before any merge is learned, and written atomically by the surgery. A special token gets the
    method's row for a token without text bytes (fvt: the mean base row)."""
    from transplant.assets.sources import resolve_source
    from transplant.pipeline import transplant

    check_requested_tokens(new_tokens, special_tokens)
    source = resolve_source(model, need_model=True, revision=revision)
    inputs = [source.model_dir, *([Path(tokenizer)] if tokenizer and Path(tokenizer).exists() else []),
              *existing_paths((options or {}).values())]  # a hypernetwork or corpus given through --set
    if output:  # before learning merges from a large corpus; the default name needs the count learned
        check_output(output, overwrite=overwrite, protected=inputs)
    base_vocab = load_vocab(tokenizer or source.tokenizer_spec, trust_remote_code=trust_remote_code)
    texts = [corpus] if isinstance(corpus, str) else corpus
    extended, added = extend_tokenizer(base_vocab, new_tokens=new_tokens, corpus=texts, n=n,
                                       special_tokens=special_tokens)
    if not added:
        raise TransplantError("no tokens to add: every requested token already exists (or the corpus repeats "
                              "nothing)")
    log.info("adding %d tokens", len(added))
    output = Path(output) if output else Path("out") / f"{Path(str(model)).name}-extended-{len(added)}"
    check_output(output, overwrite=overwrite, protected=inputs,
                 estimate_bytes=estimate_output_bytes(source.model_dir, len(extended)))
    with tempfile.TemporaryDirectory() as tmp:
        extended.save(tmp)
        result = transplant(source.model_dir, tmp, method=method, output=output, overwrite=overwrite,
                            eval_texts=eval_texts, options=options)
    result.extra["added_tokens"] = added
    result.extra["donor_label"] = "extended tokenizer"
    return result
