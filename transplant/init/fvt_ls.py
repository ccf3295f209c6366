"""`fvt-ls`: FVT's pieces, weighted by how they compose the token in the donor space (ridge towards FVT).

FVT gives a new token the mean of the base rows of its base segmentation: the right pieces, equal weights.
OMP finds weights in the donor space but over anchors chosen by correlation, which on a large vocabulary picks
pieces unrelated to the token's bytes (bench/RESULTS.md: OMP loses to FVT on SmolLM2 ← Gemma-3). This method
keeps FVT's support (the token's own base pieces, plus optionally its `neighbours` nearest anchors) and fits
the weights by least squares in the donor space, shrunk towards FVT's equal weights:

    w = argmin ‖d − Aᵀw‖² + λ·s²·‖w − u‖²      (A: donor rows of the support [m, D], u: FVT's 1/|P| weights,
                                                s²: mean squared norm of A's rows, λ = `ridge`)

solved for every token at once as one batched m×m system. λ → ∞ is FVT exactly; λ = 0 is least squares on a
fixed support (FVT is the special case of fixed equal weights). A token whose pieces are not all anchors (a
piece the donor vocabulary lacks has no donor row) keeps FVT's row.
"""

from __future__ import annotations

import torch

from transplant.init.base import InitContext, InitPlan, copy_shared, mean_rows, normal_base_ids, sparse_rows
from transplant.init.donor import cosine_topk, select_anchors
from transplant.init.registry import Option, register
from transplant.tokenizers.segment import segment_with_base
from transplant.tokenizers.vocab import TokenKind

OPTIONS = (
    Option("ridge", float, 1.0, "shrinkage towards FVT's equal weights (0: least squares; large: fvt)", min=0.0),
    Option("neighbours", int, 0, "nearest donor-space anchors added to the token's own pieces", min=0, max=256),
    Option("batch", int, 8192, "tokens per batched solve (memory: batch × support² floats)", min=1),
)


def ridge_weights(targets: torch.Tensor, support_rows: torch.Tensor, prior: torch.Tensor, valid: torch.Tensor,
                  ridge: float) -> torch.Tensor:
    """Weights [B, M] minimising ‖t − Σ w·a‖² + ridge·s²·‖w − prior‖² per row; padded slots (valid False) get 0.

    targets [B, D], support_rows [B, M, D] (zeros where padded), prior [B, M], valid bool [B, M]. Equals solving
    (A Aᵀ + λs² I) w = A t + λs² u for each token, with A = support_rows[b] (an M×M system per token).
    """
    gram = support_rows @ support_rows.transpose(1, 2)  # [B, M, M]
    counts = valid.sum(1).clamp_min(1).to(targets.dtype)
    scale = (gram.diagonal(dim1=1, dim2=2) * valid).sum(1) / counts  # s² per token
    shrink = (ridge * scale).clamp_min(1e-8)[:, None]
    diagonal = torch.where(valid, shrink, torch.ones_like(shrink))  # padded slots: w = 0 exactly
    system = gram + torch.diag_embed(diagonal)
    rhs = (support_rows @ targets[:, :, None])[..., 0] + shrink * prior * valid
    return torch.linalg.solve(system, rhs) * valid


@register("fvt-ls", needs_donor=True, options=OPTIONS)
def fvt_ls_init(ctx: InitContext) -> InitPlan:
    ctx.require_donor("fvt-ls")
    anchors = select_anchors(ctx, ctx.options["min_norm_ratio"])
    anchor_of_base = torch.full((len(ctx.base_vocab),), -1, dtype=torch.long)
    anchor_of_base[anchors.base_ids] = torch.arange(anchors.base_ids.numel())
    kinds, token_bytes = ctx.new_vocab.kinds, ctx.new_vocab.token_bytes
    new_ids = [i for i in ctx.alignment.unshared_new_ids.tolist() if kinds[i] is not TokenKind.SPECIAL and token_bytes[i]]
    pieces = segment_with_base(ctx.base_vocab, [token_bytes[i] for i in new_ids])
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    fitted: list[tuple[int, list[int]]] = []
    kept_fvt = 0
    for new_id, base_ids in zip(new_ids, pieces):
        positions = anchor_of_base[torch.tensor(base_ids, dtype=torch.long)].tolist() if base_ids else []
        if base_ids and min(positions) >= 0:
            fitted.append((new_id, positions))
        elif base_ids:  # a piece without a donor row: FVT's row
            kept_fvt += 1
            rows += [new_id] * len(base_ids)
            cols += base_ids
            vals += [1.0 / len(base_ids)] * len(base_ids)
    donor = ctx.donor_input.float()
    dictionary = donor[anchors.new_ids.to(donor.device)]
    ridge, neighbours, batch = ctx.options["ridge"], ctx.options["neighbours"], ctx.options["batch"]
    errors = []
    for start in range(0, len(fitted), batch):
        part = fitted[start : start + batch]
        targets = donor[torch.tensor([t for t, _ in part], device=donor.device)]
        width = max(len(p) for _, p in part)
        support = torch.zeros(len(part), width + neighbours, dtype=torch.long)
        prior = torch.zeros(len(part), width + neighbours)
        valid = torch.zeros(len(part), width + neighbours, dtype=torch.bool)
        for row, (_, positions) in enumerate(part):
            support[row, : len(positions)] = torch.tensor(positions)
            prior[row, : len(positions)] = 1.0 / len(positions)
            valid[row, : len(positions)] = True
        if neighbours:
            _, near = cosine_topk(targets, dictionary, neighbours + width)
            for row, (_, positions) in enumerate(part):  # nearest anchors not already among the pieces
                extra = [p for p in near[row].tolist() if p not in positions][:neighbours]
                support[row, width : width + len(extra)] = torch.tensor(extra, dtype=torch.long)
                valid[row, width : width + len(extra)] = True
        support_rows = dictionary[support.to(donor.device)] * valid[..., None].to(donor.device)
        weights = ridge_weights(targets, support_rows, prior.to(donor.device), valid.to(donor.device), ridge).cpu()
        approx = (weights[..., None].to(donor.device) * support_rows).sum(1)
        errors.append(((targets - approx).norm(dim=1) / targets.norm(dim=1).clamp_min(1e-12)).cpu())
        keep = valid & (weights != 0)
        token_ids = torch.tensor([t for t, _ in part], dtype=torch.long)[:, None].expand_as(support)
        rows += token_ids[keep].tolist()
        cols += anchors.base_ids[support[keep]].tolist()
        vals += weights[keep].tolist()
    weights = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    built = {t for t, _ in fitted} | {i for i, p in zip(new_ids, pieces) if p}
    unfilled = torch.tensor([i for i in ctx.alignment.unshared_new_ids.tolist() if i not in built], dtype=torch.long)
    dense = mean_rows(unfilled, normal_base_ids(ctx.base_vocab)) if unfilled.numel() else None
    return InitPlan(weights, dense_rows=dense, notes={
        "anchors": int(anchors.new_ids.numel()), "fitted": len(fitted), "kept_fvt": kept_fvt,
        "mean_filled": int(unfilled.numel()), "ridge": ridge, "neighbours": neighbours,
        "reconstruction_error": torch.cat(errors) if errors else torch.empty(0)})
