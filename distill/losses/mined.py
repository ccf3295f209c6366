"""MinED distillation (Wan et al., "Knowledge Fusion of Large Language Models", 2024).

Each student token is paired with the teacher token of minimum byte edit distance, the teacher's next-token
distribution is carried onto the student vocabulary through that pairing (q(v) = p_t(map(v)), renormalised;
student tokens without a partner get 0) and the student is trained with KL(q || p_s) at aligned positions
(chunk ends, where both have read the same bytes). Unlike ULD it says *which* token to predict, at the price
of a heuristic token correspondence.

Settings as published (FuseLLM, Wan et al. 2024, section 4.1): L = lambda * L_CLM + (1 - lambda) * L_Fusion
with
lambda = 0.9, temperature 1: the student's own next-token CE weighted 0.9 (this loss's registered `ce_weight`,
added by the trainer unless the recipe sets `loss.ce_weight`) and this term weighted `weight` = 0.1. L_Fusion
there is the cross-entropy to the projected teacher distribution, i.e. this KL plus the teacher's entropy (a
constant: same gradients).

The mapping (`mined_mapping`): exact byte matches first (a dictionary join; specials join on role or literal
text), then, for the remaining student tokens, an exact Levenshtein distance over a candidate set instead of
the whole teacher vocabulary (49k x 262k pairs would be ~10^10 DP tables):
  - the `window` teacher tokens on each side of the query in byte-sorted order (they share its longest
    prefixes),
  - the same in reversed-byte order (longest shared suffixes),
  - the query with its leading space removed or added, when that exists in the teacher.
Ties go to the smaller length difference, then the smaller teacher id. The DP runs vectorised over all
(query, candidate) pairs at once in numpy (a row at a time, insertions via a running minimum), on the first
`max_bytes` bytes of each token. With a window covering the whole teacher vocab it is exact (tested).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from distill.losses.common import fp32, normalise, pad_vocab, rows_at
from distill.losses.registry import Option, PairContext, register
from distill.losses.uld import count_chunk_items
from transplant.tokenizers.vocab import TokenKind, Vocab

logger = logging.getLogger(__name__)
_CACHE: dict[tuple, tuple[weakref.ref, weakref.ref, torch.Tensor]] = {}


class _Packed:
    """Byte strings as a zero-padded uint8 matrix [N, width] plus lengths (capped at width)."""

    def __init__(self, items: list[bytes], width: int):
        self.width = width
        self.matrix = np.frombuffer(b"".join(x[:width].ljust(width, b"\0") for x in items),
                                    np.uint8).reshape(len(items), width)
        self.lengths = np.minimum(np.fromiter(map(len, items), np.int64, len(items)), width)


def _levenshtein_indexed(left: _Packed, right: _Packed, left_idx: np.ndarray, right_idx: np.ndarray,
                         block: int = 65536) -> np.ndarray:
    """Edit distance of left[left_idx[k]] vs right[right_idx[k]] for every k.

    Pairs run in blocks of similar length (sorted by the longer side), so a block of short tokens runs a
    short, narrow DP; one DP row per step of the left string, vectorised over the block; int16 keeps rows
    small."""
    len_left, len_right = left.lengths[left_idx], right.lengths[right_idx]
    order = np.argsort(np.maximum(len_left, len_right), kind="stable")
    out = np.empty(left_idx.size, dtype=np.int64)
    for lo in range(0, left_idx.size, block):
        idx = order[lo:lo + block]
        len_a, len_b = len_left[idx], len_right[idx]
        width = max(1, int(len_a.max(initial=0)), int(len_b.max(initial=0)))
        a = left.matrix[left_idx[idx], :width]
        b = right.matrix[right_idx[idx], :width]
        cols = np.arange(width + 1, dtype=np.int16)
        row = np.broadcast_to(cols, (idx.size, width + 1)).copy()  # D[0][j] = j
        result = len_b.copy()  # pairs with an empty left side
        pairs = np.arange(idx.size)
        for i in range(1, int(len_a.max(initial=0)) + 1):
            # D[i][j] = min(D[i-1][j-1] + cost, D[i-1][j] + 1, D[i][j-1] + 1); the last term is a running min.
            cand = np.minimum(row[:, :-1] + (a[:, i - 1:i] != b), row[:, 1:] + 1)
            row[:, 0] = i
            row[:, 1:] = cand
            row = np.minimum.accumulate(row - cols, axis=1) + cols
            done = len_a == i
            result[done] = row[pairs[done], len_b[done]]
        out[idx] = result
    return out


def levenshtein_pairs(left: list[bytes], right: list[bytes], max_bytes: int = 48,
                      block: int = 65536) -> np.ndarray:
    """Exact byte edit distance of each pair (left[i], right[i]) on their first `max_bytes` bytes."""
    width = max(1, min(max_bytes, max(map(len, left + right), default=1)))
    index = np.arange(len(left))
    return _levenshtein_indexed(_Packed(left, width), _Packed(right, width), index, index, block)


def _sorted_neighbours(pool: list[bytes], queries: list[bytes], window: int) -> np.ndarray:
    """[Q, 2*window]: indices into `pool` of the entries around each query's position in byte-sorted order."""
    width = max(1, max(map(len, pool + queries), default=1))
    keys = np.array(pool, dtype=f"S{width}")  # numpy orders S-strings bytewise, like Python bytes
    order = np.argsort(keys, kind="stable")
    at = np.searchsorted(keys[order], np.array(queries, dtype=f"S{width}"))
    around = np.clip(at[:, None] + np.arange(-window, window), 0, len(pool) - 1)
    return order[around]


def _special_partner(sid: int, student_vocab: Vocab, teacher_vocab: Vocab,
                     teacher_texts: dict[str, int]) -> int:
    role = student_vocab.role_of.get(sid)
    tid = teacher_vocab.roles.get(role) if role is not None else None
    return tid if tid is not None else teacher_texts.get(student_vocab.special_texts.get(sid), -1)


def mined_mapping(student_vocab: Vocab, teacher_vocab: Vocab, *, window: int = 8,
                  max_bytes: int = 48) -> torch.Tensor:
    """Long [len(student)]: teacher id of minimum byte edit distance for every student id (-1: none).

    Cached per vocabulary pair for the life of both objects."""
    key = (id(student_vocab), id(teacher_vocab), window, max_bytes)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is student_vocab and hit[1]() is teacher_vocab:
        return hit[2]
    mapping = np.full(len(student_vocab), -1, dtype=np.int64)
    exact = teacher_vocab.bytes_to_id
    teacher_texts = {t: i for i, t in teacher_vocab.special_texts.items()}
    pending: list[int] = []
    for sid, (piece, kind) in enumerate(zip(student_vocab.token_bytes, student_vocab.kinds)):
        if kind is TokenKind.SPECIAL:
            mapping[sid] = _special_partner(sid, student_vocab, teacher_vocab, teacher_texts)
        elif piece in exact:
            mapping[sid] = exact[piece]
        elif piece:
            pending.append(sid)
    if pending and exact:
        pool_ids = np.fromiter(exact.values(), np.int64, len(exact))
        pool = list(exact)
        queries = [student_vocab.token_bytes[sid] for sid in pending]
        forward = pool_ids[_sorted_neighbours(pool, queries, window)]
        backward = pool_ids[_sorted_neighbours([p[::-1] for p in pool], [q[::-1] for q in queries], window)]
        spaced = np.fromiter((exact.get(q[1:] if q[:1] == b" " else b" " + q, -1) for q in queries), np.int64,
                             len(queries))
        candidates = np.concatenate([forward, backward, spaced[:, None]], axis=1)
        query_idx = np.repeat(np.arange(len(queries)), candidates.shape[1])
        cand_ids = candidates.reshape(-1)
        keep = cand_ids >= 0
        pairs = np.unique(query_idx[keep] * len(teacher_vocab) + cand_ids[keep])
        query_idx, cand_ids = pairs // len(teacher_vocab), pairs % len(teacher_vocab)
        width = max(1, min(max_bytes, max(map(len, queries))))
        distance = _levenshtein_indexed(_Packed(queries, width), _Packed(teacher_vocab.token_bytes, width),
                                        query_idx, cand_ids)
        query_len = np.fromiter(map(len, queries), np.int64, len(queries))
        teacher_len = np.fromiter(map(len, teacher_vocab.token_bytes), np.int64, len(teacher_vocab))
        len_gap = np.minimum(np.abs(query_len[query_idx] - teacher_len[cand_ids]), 4095)
        # best per query: smallest distance, then smallest length gap, then smallest teacher id
        score = (distance * 4096 + len_gap) * (1 << 24) + cand_ids
        order = np.lexsort((score, query_idx))
        first = np.ones(order.size, bool)
        first[1:] = query_idx[order][1:] != query_idx[order][:-1]
        mapping[np.asarray(pending)[query_idx[order][first]]] = cand_ids[order][first]
        logger.info("MinED: %d exact, %d by edit distance over %d candidate pairs",
                    len(student_vocab) - len(pending), len(pending), pairs.size)
    result = torch.from_numpy(mapping)
    _CACHE[key] = (weakref.ref(student_vocab), weakref.ref(teacher_vocab), result)
    return result


def prepare_mined(ctx: PairContext) -> dict[str, torch.Tensor]:
    """The student -> teacher id map, once per run (seconds for a 262k teacher vocab; cached per pair)."""
    return {"mined_mapping": mined_mapping(ctx.student_vocab, ctx.teacher_vocab)}


MINED_WEIGHT = 0.1  # 1 - lambda of FuseLLM
MINED_CE_WEIGHT = 0.9  # lambda


MINED_OPTIONS = (
    Option("temperature", float, 1.0, "softmax temperature of both sides", min=0.0),
    Option("weight", float, MINED_WEIGHT, "weight of the MinED term (FuseLLM's 1 - lambda)", min=0.0),
)


@register("mined", count_items=count_chunk_items, sum_metrics=("mined",), prepare=prepare_mined,
          ce_weight=MINED_CE_WEIGHT, options=MINED_OPTIONS)
def mined_loss(batch: Mapping[str, Any], *, num_items: float | torch.Tensor | None = None,
               temperature: float = 1.0,
               weight: float = MINED_WEIGHT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`weight` x KL(teacher projected onto the student vocab || student) at chunk ends (metric "mined": the
    unweighted term); needs batch["mined_mapping"]."""
    alignment = batch["alignment"]
    valid = alignment.chunk_mask
    teacher = fp32(rows_at(batch["teacher_logits"].detach(), alignment.teacher_chunk_last, valid))
    student = fp32(rows_at(batch["student_logits"], alignment.student_chunk_last, valid))
    mapping = batch["mined_mapping"].to(student.device)
    mapping = pad_vocab(mapping, student.shape[-1], -1)  # logits may be padded beyond the vocabulary
    teacher_logp = torch.log_softmax(teacher / temperature, dim=-1)
    projected = teacher_logp[:, mapping.clamp(min=0)].masked_fill(mapping < 0, float("-inf"))
    projected = projected - torch.logsumexp(projected, dim=-1, keepdim=True)
    student_logp = torch.log_softmax(student / temperature, dim=-1)
    q = projected.exp()
    kl = torch.where(q > 0, q * (projected - student_logp), torch.zeros_like(q)).sum()
    count = valid.sum()
    term = normalise(kl, count, num_items)
    loss = weight * term
    return loss, {"loss": loss.detach(), "mined": term.detach(), "num_items_local": count.detach()}
