"""MinED distillation (Wan et al., "Knowledge Fusion of Large Language Models", 2024).

Each student token is paired with the teacher token of minimum byte edit distance, the teacher's next-token
distribution is carried onto the student vocabulary through that pairing (q(v) = p_t(map(v)), renormalised;
student tokens without a partner get 0) and the student is trained with KL(q || p_s) at aligned positions
(chunk ends, where both have read the same bytes). Unlike ULD it says *which* token to predict, at the price of a
heuristic token correspondence.

The mapping (`mined_mapping`): exact byte matches first (a dictionary join; specials join on role or literal
text), then, for the remaining student tokens, an exact Levenshtein distance over a candidate set instead of the
whole teacher vocabulary (49k x 262k pairs would be ~10^10 DP tables):
  - the `window` teacher tokens on each side of the query in byte-sorted order (they share its longest prefixes),
  - the same in reversed-byte order (longest shared suffixes),
  - the query with its leading space removed or added, when that exists in the teacher.
Ties go to the smaller length difference, then the smaller teacher id. The DP runs vectorised over all
(query, candidate) pairs at once in numpy (a row at a time, insertions via a running minimum), on the first
`max_bytes` bytes of each token. With a window covering the whole teacher vocab it is exact (tested).
"""

from __future__ import annotations

import bisect
import logging
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from distill.losses import register
from distill.losses.common import fp32, normalise, rows_at
from distill.losses.uld import count_chunk_items
from transplant.vocab import TokenKind, Vocab

logger = logging.getLogger(__name__)
_CACHE: dict[tuple, tuple[weakref.ref, weakref.ref, torch.Tensor]] = {}


def levenshtein_pairs(left: list[bytes], right: list[bytes], max_bytes: int = 48,
                      block: int = 65536) -> np.ndarray:
    """Exact byte edit distance of each pair (left[i], right[i]) on their first `max_bytes` bytes."""
    out = np.empty(len(left), dtype=np.int64)
    for lo in range(0, len(left), block):
        a_list, b_list = left[lo:lo + block], right[lo:lo + block]
        width = max(1, max(map(len, a_list), default=1), max(map(len, b_list), default=1))
        width = min(width, max_bytes)
        a = np.frombuffer(b"".join(x[:width].ljust(width, b"\0") for x in a_list), np.uint8).reshape(-1, width)
        b = np.frombuffer(b"".join(x[:width].ljust(width, b"\0") for x in b_list), np.uint8).reshape(-1, width)
        len_a = np.minimum(np.fromiter(map(len, a_list), np.int64, len(a_list)), width)
        len_b = np.minimum(np.fromiter(map(len, b_list), np.int64, len(b_list)), width)
        cols = np.arange(width + 1)
        row = np.broadcast_to(cols, (len(a_list), width + 1)).copy()  # D[0][j] = j
        result = len_b.copy()  # pairs with an empty left side
        rows_idx = np.arange(len(a_list))
        for i in range(1, int(len_a.max(initial=0)) + 1):
            # D[i][j] = min(D[i-1][j-1] + cost, D[i-1][j] + 1, D[i][j-1] + 1); the last term is a running min.
            cand = np.minimum(row[:, :-1] + (a[:, i - 1:i] != b), row[:, 1:] + 1)
            row = np.concatenate([np.full((len(a_list), 1), i), cand], axis=1)
            row = np.minimum.accumulate(row - cols, axis=1) + cols
            done = len_a == i
            result[done] = row[rows_idx[done], len_b[done]]
        out[lo:lo + block] = result
    return out


def _candidates(query: bytes, fwd_keys: list[bytes], fwd_ids: list[int], rev_keys: list[bytes],
                rev_ids: list[int], exact: dict[bytes, int], window: int) -> set[int]:
    found: set[int] = set()
    at = bisect.bisect_left(fwd_keys, query)
    found.update(fwd_ids[max(0, at - window):at + window])
    at = bisect.bisect_left(rev_keys, query[::-1])
    found.update(rev_ids[max(0, at - window):at + window])
    for variant in (query[1:] if query[:1] == b" " else b" " + query,):
        if variant in exact:
            found.add(exact[variant])
    return found


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
    pending: list[int] = []
    for sid, (piece, kind) in enumerate(zip(student_vocab.token_bytes, student_vocab.kinds)):
        if kind is TokenKind.SPECIAL:
            continue
        if piece in exact:
            mapping[sid] = exact[piece]
        elif piece:
            pending.append(sid)
    teacher_texts = {t: i for i, t in teacher_vocab.special_texts.items()}
    for sid in (i for i, k in enumerate(student_vocab.kinds) if k is TokenKind.SPECIAL):
        role = student_vocab.role_of.get(sid)
        tid = teacher_vocab.roles.get(role) if role is not None else None
        if tid is None:
            tid = teacher_texts.get(student_vocab.special_texts.get(sid), -1)
        mapping[sid] = tid
    if pending:
        pool = sorted(exact.items())
        fwd_keys, fwd_ids = [p for p, _ in pool], [i for _, i in pool]
        rev = sorted((p[::-1], i) for p, i in pool)
        rev_keys, rev_ids = [p for p, _ in rev], [i for _, i in rev]
        queries, cands, owners = [], [], []
        for sid in pending:
            piece = student_vocab.token_bytes[sid]
            found = _candidates(piece, fwd_keys, fwd_ids, rev_keys, rev_ids, exact, window)
            owners.extend([sid] * len(found))
            cands.extend(found)
            queries.extend([piece] * len(found))
        teacher_bytes = teacher_vocab.token_bytes
        distance = levenshtein_pairs(queries, [teacher_bytes[c] for c in cands], max_bytes)
        len_gap = np.abs(np.fromiter(map(len, queries), np.int64, len(queries))
                         - np.fromiter((len(teacher_bytes[c]) for c in cands), np.int64, len(cands)))
        owner_arr, cand_arr = np.asarray(owners, np.int64), np.asarray(cands, np.int64)
        score = (distance * 4096 + np.minimum(len_gap, 4095)) * (1 << 24) + cand_arr
        order = np.lexsort((score, owner_arr))
        first = np.ones(order.size, bool)
        first[1:] = owner_arr[order][1:] != owner_arr[order][:-1]
        mapping[owner_arr[order][first]] = cand_arr[order][first]
        logger.info("MinED: %d exact, %d by edit distance over %d candidate pairs",
                    len(student_vocab) - len(pending), len(pending), len(cands))
    result = torch.from_numpy(mapping)
    _CACHE[key] = (weakref.ref(student_vocab), weakref.ref(teacher_vocab), result)
    return result


@register("mined", count_items=count_chunk_items)
def mined_loss(batch: Mapping[str, Any], *, num_items: float | torch.Tensor | None = None,
               temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(teacher projected onto the student vocab || student) at chunk ends; needs batch["mined_mapping"]."""
    alignment = batch["alignment"]
    valid = alignment.chunk_mask
    teacher = fp32(rows_at(batch["teacher_logits"].detach(), alignment.teacher_chunk_last, valid))
    student = fp32(rows_at(batch["student_logits"], alignment.student_chunk_last, valid))
    mapping = batch["mined_mapping"].to(student.device)
    if mapping.shape[0] < student.shape[-1]:  # logits padded beyond the vocabulary
        mapping = torch.cat([mapping, mapping.new_full((student.shape[-1] - mapping.shape[0],), -1)])
    mapping = mapping[: student.shape[-1]]
    teacher_logp = torch.log_softmax(teacher / temperature, dim=-1)
    projected = teacher_logp[:, mapping.clamp(min=0)].masked_fill(mapping < 0, float("-inf"))
    projected = projected - torch.logsumexp(projected, dim=-1, keepdim=True)
    student_logp = torch.log_softmax(student / temperature, dim=-1)
    q = projected.exp()
    kl = torch.where(q > 0, q * (projected - student_logp), torch.zeros_like(q)).sum()
    count = valid.sum()
    loss = normalise(kl, count, num_items)
    return loss, {"loss": loss.detach(), "mined": loss.detach(), "num_items_local": count.detach()}
