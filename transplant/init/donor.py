"""What the donor-embedding methods (omp, knn, focus) share: anchors and the row-combination plan.

These methods find, in the donor's embedding space, how a new token relates to tokens both vocabularies share
(the anchors), then apply the same weights to the anchors' rows in the base space. Anchors that look
under-trained (a row norm far below the typical one: tokens the model never saw keep their tiny init) are
excluded in both spaces, since a combination of noise vectors transfers nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from transplant.errors import TransplantError
from transplant.init.base import InitContext, InitPlan, copy_shared, mean_rows, normal_base_ids, sparse_rows
from transplant.tokenizers.vocab import TokenKind

log = logging.getLogger(__name__)

# (targets [B, D], anchor dictionary [N, D]) -> (anchor positions [B, k], weights [B, k])
Combiner = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Anchors:
    new_ids: torch.Tensor  # anchor ids in the new (= donor) vocabulary
    base_ids: torch.Tensor  # the same tokens' ids in the base vocabulary
    excluded: int  # shared tokens dropped as under-trained
    twins: int = 0  # shared tokens dropped because another anchor already stands for their base row


def undertrained(rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rows whose norm is below `ratio` × the median norm: the signature of never-updated embeddings."""
    norms = rows.float().norm(dim=1)
    return norms < ratio * norms.median()


def select_anchors(ctx: InitContext, min_norm_ratio: float) -> Anchors:
    """Shared normal tokens whose rows look trained in the donor and in the base model, one per base row.

    A byte-fallback token (Gemma's `<0x0A>`) shares its base row with the normal token of the same bytes
    ("\\n"), but its donor row is another embedding: a composition over it would be carried into the base
    space by the normal token's row. On SmolLM2 ← Gemma-3 OMP rebuilt 4,028 donor rows "well" only through
    such twins, and giving them those rows cost code 0.018 and Python docs 0.022 bits/byte (bench/RESULTS.md,
    "Within three minutes, end to end"). So each base row keeps one anchor, a normal token before a byte
    token."""
    alignment = ctx.alignment
    kinds = ctx.new_vocab.kinds
    candidates = [i for i in alignment.shared_new_ids.tolist() if kinds[i] is not TokenKind.SPECIAL]
    candidates.sort(key=lambda i: kinds[i] is TokenKind.BYTE)  # stable: normal tokens first
    new_ids = torch.tensor(candidates, dtype=torch.long)
    base_ids = alignment.new_to_base[new_ids]
    bad = undertrained(ctx.donor_input[new_ids.to(ctx.donor_input.device)], min_norm_ratio).cpu()
    bad |= undertrained(ctx.base_input[base_ids.to(ctx.base_input.device)], min_norm_ratio).cpu()
    taken: set[int] = set()
    twin = torch.zeros(new_ids.numel(), dtype=torch.bool)
    for j in (~bad).nonzero().flatten().tolist():
        base_id = int(base_ids[j])
        twin[j] = base_id in taken
        taken.add(base_id)
    keep = ~bad & ~twin
    order = torch.argsort(new_ids[keep])  # ascending new ids, as before the twins were sorted out
    return Anchors(new_ids[keep][order], base_ids[keep][order], int(bad.sum()), int(twin.sum()))


def cosine_topk(targets: torch.Tensor, dictionary: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m anchors most cosine-similar to each target: (similarities [B, m], positions [B, m])."""
    sims = torch.nn.functional.normalize(targets, dim=1) @ torch.nn.functional.normalize(dictionary, dim=1).T
    return sims.topk(min(m, dictionary.shape[0]), dim=1)


def relative_error(targets: torch.Tensor, dictionary: torch.Tensor, positions: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """‖target − Σ w·anchor‖ / ‖target‖ in the donor space: how well each new token was reconstructed."""
    approx = torch.zeros_like(targets)
    for j in range(positions.shape[1]):  # k gathers of [B, D], never a [B, k, D] tensor
        approx += weights[:, j, None].float() * dictionary[positions[:, j]]
    return (targets - approx).norm(dim=1) / targets.norm(dim=1).clamp_min(1e-12)


def in_batches(combine: Combiner, batch_size: int = 4096, desc: str = "") -> Combiner:
    """Wrap a per-batch combiner (GEMM + topk) so memory stays bounded over hundreds of thousands of
    targets."""

    def run(targets: torch.Tensor, dictionary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions, weights = [], []
        for start in tqdm(range(0, targets.shape[0], batch_size), desc=desc, leave=False,
                          disable=targets.shape[0] <= batch_size):
            pos, w = combine(targets[start : start + batch_size], dictionary)
            positions.append(pos)
            weights.append(w)
        return torch.cat(positions), torch.cat(weights)

    return run


def donor_plan(ctx: InitContext, method: str, combine: Combiner, notes: dict | None = None,
               targets: torch.Tensor | None = None) -> InitPlan:
    """Run `combine` on all new tokens at once (or on `targets`, new ids) in the donor input space (and in the
    output space when the donor has its own lm_head): solvers such as OMP build per-dictionary state (a Gram
    matrix) only once."""
    ctx.require_donor(method)
    anchors = select_anchors(ctx, ctx.options["min_norm_ratio"])
    if anchors.new_ids.numel() == 0:
        raise TransplantError(f"{method}: the vocabularies share no usable anchor tokens; use --method fvt")
    targets = text_targets(ctx) if targets is None else targets
    plans = {}
    reconstruction = torch.empty(0)
    spaces = {"input": ctx.donor_input}
    if ctx.donor_output is not None:
        spaces["output"] = ctx.donor_output
    for role, donor in spaces.items():
        rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
        if targets.numel():
            dictionary = donor[anchors.new_ids.to(donor.device)].float()
            target_rows = donor[targets.to(donor.device)].float()
            log.info("%s (%s): %d new tokens over %d anchors", method, role, targets.numel(),
                     dictionary.shape[0])
            pos, w = combine(target_rows, dictionary)
            pos, w = pos.to(dictionary.device), w.float().to(dictionary.device)
            if role == "input":
                reconstruction = torch.cat([relative_error(target_rows[i : i + 8192], dictionary,
                                                           pos[i : i + 8192], w[i : i + 8192]).cpu()
                                            for i in range(0, targets.numel(), 8192)])
            pos, w = pos.cpu(), w.cpu()
            k = pos.shape[1]
            keep = w.reshape(-1) != 0  # sparsemax / early-stopped OMP leave exact zeros: not stored
            rows += targets.repeat_interleave(k)[keep].tolist()
            cols += anchors.base_ids[pos.reshape(-1)][keep].tolist()
            vals += w.reshape(-1)[keep].tolist()
        plans[role] = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    specials = [i for i in ctx.alignment.unshared_new_ids.tolist()
                if ctx.new_vocab.kinds[i] is TokenKind.SPECIAL]
    dense = (mean_rows(torch.tensor(specials, dtype=torch.long), normal_base_ids(ctx.base_vocab))
             if specials else None)
    info = {"anchors": int(anchors.new_ids.numel()), "anchors_excluded_undertrained": anchors.excluded,
            "anchors_excluded_twins": anchors.twins,
            "reconstruction_error": reconstruction, "targets": targets, **(notes or {})}
    return InitPlan(plans["input"], plans.get("output"), dense_rows=dense, notes=info)


def text_targets(ctx: InitContext) -> torch.Tensor:
    """The new ids a donor method solves for: the unshared tokens that are not special (`donor_plan` gives
    specials the mean of the base's normal rows instead)."""
    kinds = ctx.new_vocab.kinds
    return torch.tensor([i for i in ctx.alignment.unshared_new_ids.tolist()
                         if kinds[i] is not TokenKind.SPECIAL],
                        dtype=torch.long)
