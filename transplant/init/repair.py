"""Rows no initializer should leave behind, repaired after every method: the pipeline step between the
initializer and surgery (`repair_rows`).

1. **Unreachable tokens** (`transplant.init.reachable`) get the mean base row in the output role. The logit of
   the mean row is the mean of the base logits (h·mean(E) = mean(h·E)), and by Jensen exp(mean logit) ≤
   mean(exp logit), so such a row takes at most about 1/V_base of the probability mass in any context — it can
   no longer halve the probability of `1` or ` ` as an exact copy of their row does. A tied model has one
   matrix, so the row is replaced there; an untied model keeps its input row (the token is never read anyway).
2. **Near-duplicates of frequent rows**: a new token whose row (per role) has cosine > `dedup_cosine` with the
   row of one of the `dedup_top` most frequent shared tokens steals that token's output mass (omp writes
   near-copies of `▁` onto rare tokens; fvt makes `isis` an exact copy of `is`, numbers' untied output rule
   makes every `1xx` a copy of `1`). Such a row falls back to FVT's row of the token; where that is a
   near-copy too (a repeated piece), to the midpoint of FVT's row and the mean row, which halves its logit.
   Frequency is the base id order: BPE ids follow merge order, which follows corpus frequency, so no text is
   needed at transplant time.
3. **Norms** (`rescale_norm`, off by default): a mean of k rows is shorter than the rows it averages; new
   input rows can be rescaled to the mean norm of their base pieces (`pieces`) or to the base's median row
   norm (`median`). Output rows are never rescaled: in the output role that shortness is what keeps 200k
   new tokens from outbidding the shared ones, and a tied model rescaled this way put all of its mass on new
   tokens. bench/RESULTS.md, "Unreachable rows and fidelity fixes", has the measurements behind each default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from transplant.init.base import InitContext, normal_base_ids, row_mean, row_norms
from transplant.init.reachable import unreachable_ids
from transplant.tokenizers.segment import segment_with_base
from transplant.tokenizers.vocab import TokenKind

log = logging.getLogger(__name__)

PROJECTION_DIM = 128  # near-duplicate search runs in a random projection first; exact cosines confirm
SEARCH_MARGIN = 0.05  # projected candidates down to threshold − margin are checked exactly


@dataclass
class RepairSummary:
    """What `repair_rows` changed, for report.json: ids and (new id, frequent id, cosine) triples."""

    unreachable: list[int] = field(default_factory=list)
    duplicates: list[tuple[int, int, float]] = field(default_factory=list)
    duplicates_shrunk: int = 0
    rescaled: int = 0

    def stats(self) -> dict[str, int]:
        return {"unreachable_rows": len(self.unreachable), "near_duplicates_repaired": len(self.duplicates)}


def id_mask(ids: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean [size] mask of `ids` (torch.isin sorts; this is one scatter)."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[ids] = True
    return mask


def mean_row(matrix: torch.Tensor, population: torch.Tensor) -> torch.Tensor:
    return row_mean(matrix, population)


def fvt_rows(ctx: InitContext, new_ids: list[int], base: torch.Tensor) -> torch.Tensor:
    """FVT's rows for `new_ids`: the mean of the base rows of each token's base segmentation (mean row if
    none)."""
    pieces = segment_with_base(ctx.base_vocab, [ctx.new_vocab.token_bytes[i] for i in new_ids])
    fallback = mean_row(base, normal_base_ids(ctx.base_vocab))
    rows = [base[torch.tensor(p, device=base.device)].float().mean(0) if p else fallback for p in pieces]
    return torch.stack(rows) if rows else base.new_zeros(0, base.shape[1], dtype=torch.float32)


def piece_norms(ctx: InitContext, new_ids: list[int], base: torch.Tensor) -> torch.Tensor:
    """Mean row norm of each token's base pieces (the base median where it has none), vectorised."""
    norms = row_norms(base).cpu()
    median = norms[normal_base_ids(ctx.base_vocab)].median()
    pieces = segment_with_base(ctx.base_vocab, [ctx.new_vocab.token_bytes[i] for i in new_ids])
    counts = torch.tensor([len(p) for p in pieces], dtype=torch.long)
    flat = torch.tensor([i for p in pieces for i in p], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(pieces)), counts)
    sums = torch.zeros(len(pieces)).index_add_(0, owner, norms[flat])
    return torch.where(counts > 0, sums / counts.clamp_min(1), median)


def frequent_ids(ctx: InitContext, top: int, exclude: torch.Tensor) -> torch.Tensor:
    """New ids of the `top` shared normal tokens with the lowest base ids (merge order ≈ frequency)."""
    alignment, kinds = ctx.alignment, ctx.new_vocab.kinds
    shared = alignment.shared_new_ids
    keep = torch.tensor([kinds[i] is TokenKind.NORMAL for i in shared.tolist()], dtype=torch.bool)
    keep &= ~id_mask(exclude, len(kinds))[shared]
    shared = shared[keep]
    order = alignment.new_to_base[shared].argsort(stable=True)
    return shared[order[:top]]


def near_duplicates(matrix: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor, threshold: float,
                    chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of `ids` whose cosine with some row of `reference` exceeds `threshold`: (ids, reference ids,
    cosines).

    A seeded random projection to 128 dimensions in bfloat16 finds candidates (a cosine of 0.99 moves by
    ~0.002 there, unrelated pairs by ~0.1), and exact float32 cosines decide, so the search over 200k rows
    costs a few seconds instead of a full-width float32 GEMM.
    """
    empty = torch.empty(0, dtype=torch.long)
    if ids.numel() == 0 or reference.numel() == 0:
        return empty, empty, torch.empty(0)
    dim = matrix.shape[1]
    ref = torch.nn.functional.normalize(matrix[reference.to(matrix.device)].float(), dim=1)
    if dim > PROJECTION_DIM:
        g = torch.Generator().manual_seed(0)
        proj = torch.linalg.qr(torch.randn(dim, PROJECTION_DIM, generator=g))[0].to(matrix.device)
    else:
        proj = torch.eye(dim, device=matrix.device)
    ref_p = torch.nn.functional.normalize(ref @ proj, dim=1).to(torch.bfloat16).T.contiguous()
    candidates = []
    for start in range(0, ids.numel(), chunk):
        part = ids[start : start + chunk].to(matrix.device)
        rows = torch.nn.functional.normalize(matrix[part].float() @ proj, dim=1).to(torch.bfloat16)
        hit = (rows @ ref_p).amax(1).float() > threshold - SEARCH_MARGIN
        candidates.append(part[hit])
    cand = torch.cat(candidates)
    if cand.numel() == 0:
        return empty, empty, torch.empty(0)
    exact = torch.nn.functional.normalize(matrix[cand].float(), dim=1) @ ref.T
    best, pos = exact.max(1)
    dup = best > threshold
    return cand[dup].cpu(), reference[pos[dup].cpu()], best[dup].cpu()


def _fix_duplicates(ctx: InitContext, matrix: torch.Tensor, base: torch.Tensor, ids: torch.Tensor,
                    reference: torch.Tensor, threshold: float, summary: RepairSummary) -> None:
    """Replace near-duplicate rows of `matrix` in place (see the module docstring, point 2)."""
    dup_ids, matches, cosines = near_duplicates(matrix, ids, reference, threshold)
    if dup_ids.numel() == 0:
        return
    rows = fvt_rows(ctx, dup_ids.tolist(), base).to(matrix.device)
    targets = torch.nn.functional.normalize(matrix[matches.to(matrix.device)].float(), dim=1)
    still = (torch.nn.functional.normalize(rows, dim=1) * targets).sum(1) > threshold
    if bool(still.any()):
        rows[still] = (rows[still] + mean_row(base, normal_base_ids(ctx.base_vocab))) / 2
    matrix[dup_ids.to(matrix.device)] = rows.to(matrix.dtype)
    known = {d for d, _, _ in summary.duplicates}
    summary.duplicates += [(int(d), int(m), round(float(c), 4))
                           for d, m, c in zip(dup_ids, matches, cosines) if int(d) not in known]
    summary.duplicates_shrunk += int(still.sum())


def _rescale(ctx: InitContext, matrix: torch.Tensor, base: torch.Tensor, ids: torch.Tensor,
             mode: str) -> None:
    if mode == "median":
        target = row_norms(base, normal_base_ids(ctx.base_vocab)).median()
        target = target.expand(ids.numel())
    else:
        target = piece_norms(ctx, ids.tolist(), base)
    rows = matrix[ids.to(matrix.device)].float()
    scale = target.to(rows.device) / rows.norm(dim=1).clamp_min(1e-12)
    matrix[ids.to(matrix.device)] = (rows * scale[:, None]).to(matrix.dtype)


def repair_rows(ctx: InitContext, new_input: torch.Tensor, new_output: torch.Tensor | None,
                options: Mapping[str, Any]) -> RepairSummary:
    """Fix the new embedding matrices in place (`new_output` None: tied); returns what was changed.

    `options` are typed and complete (`registry.parse_options`); this step reads the pipeline-level ones
    (`registry.PIPELINE_OPTIONS`): `unreachable` (mean | zero | keep), `dedup_cosine` (≥ 1 disables),
    `dedup_top`, `rescale_norm` (off | pieces | median).
    """
    summary = RepairSummary()
    if ctx.alignment.identical:  # the base's own vocabulary: every row is the base's trained row
        return summary
    new_vocab = ctx.new_vocab
    unreachable = unreachable_ids(new_vocab)
    rebuilt = ctx.alignment.unshared_new_ids
    rebuilt = rebuilt[torch.tensor([new_vocab.kinds[i] is not TokenKind.SPECIAL for i in rebuilt.tolist()],
                                   dtype=torch.bool)] if rebuilt.numel() else rebuilt
    rebuilt = rebuilt[~id_mask(unreachable, len(new_vocab))[rebuilt]]
    roles = [("input", new_input, ctx.base_input)]
    if new_output is not None:
        roles.append(("output", new_output,
                      ctx.base_output if ctx.base_output is not None else ctx.base_input))
    mode = options["rescale_norm"]
    if mode != "off" and rebuilt.numel():  # input rows only: a longer output row is a larger logit
        if new_output is None:
            log.warning("rescale_norm on a tied model also scales the output logits of every new token "
                        "(measured much worse, bench/RESULTS.md); --set untie=true rescales the input rows "
                        "only")
        _rescale(ctx, new_input, ctx.base_input, rebuilt, mode)
        summary.rescaled = int(rebuilt.numel())
    threshold, top = float(options["dedup_cosine"]), int(options["dedup_top"])
    if threshold < 1.0 and top > 0:
        reference = frequent_ids(ctx, top, unreachable)
        for _, matrix, base in roles:
            _fix_duplicates(ctx, matrix, base, rebuilt, reference, threshold, summary)
    policy = options["unreachable"]
    summary.unreachable = unreachable.tolist()
    if policy != "keep" and unreachable.numel():
        _, matrix, base = roles[-1]  # the output role: the only matrix of a tied model
        row = (mean_row(base, normal_base_ids(ctx.base_vocab)) if policy == "mean"
               else torch.zeros(base.shape[1]))
        matrix[unreachable.to(matrix.device)] = row.to(matrix.device, matrix.dtype)
    log.info("repaired rows: %d unreachable (%s), %d near-duplicates (%d shrunk to the mean), %d rescaled",
             len(summary.unreachable), policy, len(summary.duplicates), summary.duplicates_shrunk,
             summary.rescaled)
    return summary
