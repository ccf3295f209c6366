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

By default (`pursue_gap=0.4`, `pursue_min_cosine=0.6`) a token then takes exact OMP's row (k=8) where OMP
rebuilds its donor row better than this fit by more than 0.4 relative error — pursued only for tokens some
anchor points to — with that row's logit prior capped at this fit's (`pursue_prior_cap`,
transplant/init/logit_prior.py). No token class separates the two methods, this error gap does; uncapped, the
switched rows took probability from digits and lost number tables (bench/RESULTS.md, "A default at the peak",
"The switched rows' logit prior"). `pursue_gap=0` is the plain fit above.
"""

from __future__ import annotations

import torch

from transplant.init.base import (
    InitContext,
    InitPlan,
    copy_shared,
    mean_rows,
    normal_base_ids,
    replace_rows,
    sparse_rows,
)
from transplant.init.donor import cosine_topk, donor_plan, select_anchors, text_targets
from transplant.init.logit_prior import PriorCap
from transplant.init.registry import Option, register
from transplant.tokenizers.segment import segment_with_base
from transplant.tokenizers.token_class import class_set, parse_classes
from transplant.tokenizers.vocab import TokenKind

OPTIONS = (
    Option("ridge", float, 3.0,
           "shrinkage towards FVT's equal weights (0: least squares; large: fvt)", min=0.0),
    Option("neighbours", int, 0, "nearest donor-space anchors added to the token's own pieces",
           min=0, max=256),
    Option("batch", int, 8192, "tokens per batched solve (memory: batch × support² floats)", min=1),
    Option("pursue", str, "none",
           "token classes whose rows come from exact OMP instead ('+'-joined, e.g. space-word+word-piece; "
           "classes: transplant/tokenizers/token_class.py)", parse=parse_classes),
    Option("pursue_k", int, 8, "anchors per pursued token", min=1, max=4096),
    Option("pursue_gap", float, 0.4,
           "> 0: exact OMP over the new tokens fvt-ls fits (of the `pursue` classes, else all), and OMP's "
           "row wherever fvt-ls's donor-space reconstruction error exceeds OMP's by more than this (0: plain "
           "fvt-ls)", min=0.0),
    Option("pursue_screen", int, 0,
           "0: exact pursuit; r > 0: each pursued token's `pursue_candidates` anchors chosen in a rank-r "
           "projection of the donor space first, exact OMP inside them (approximate; on a 2-core CPU it "
           "saves about a quarter of the exact solve: bench/RESULTS.md, 'The screen built into the solver')",
           min=0),
    Option("pursue_candidates", int, 512, "candidates per pursued token when `pursue_screen` > 0", min=1),
    Option("pursue_min_cosine", float, 0.6,
           "with `pursue_gap`: pursue only tokens whose donor row has an anchor at |cosine| >= this "
           "(estimated without the full GEMM: transplant/solvers/nearest.py); the rest keep fvt-ls's row",
           min=0.0, max=1.0),
    Option("pursue_prior_cap", bool, True,
           "cap each pursued row's logit prior (its mean logit over the base model's own samples) at "
           "fvt-ls's row of the token: OMP's rows otherwise take probability from unrelated tokens "
           "(transplant/init/logit_prior.py)"),
)


def ridge_weights(targets: torch.Tensor, support_rows: torch.Tensor, prior: torch.Tensor, valid: torch.Tensor,
                  ridge: float) -> torch.Tensor:
    """Weights [B, M] minimising ‖t − Σ w·a‖² + ridge·s²·‖w − prior‖² per row; padded slots (valid False) get
    0.

    targets [B, D], support_rows [B, M, D] (zeros where padded), prior [B, M], valid bool [B, M]. Equals
    solving (A Aᵀ + λs² I) w = A t + λs² u for each token, with A = support_rows[b] (an M×M system per token).
    """
    gram = support_rows @ support_rows.transpose(1, 2)  # [B, M, M]
    counts = valid.sum(1).clamp_min(1).to(targets.dtype)
    scale = (gram.diagonal(dim1=1, dim2=2) * valid).sum(1) / counts  # s² per token
    shrink = (ridge * scale).clamp_min(1e-8)[:, None]
    diagonal = torch.where(valid, shrink, torch.ones_like(shrink))  # padded slots: w = 0 exactly
    system = gram + torch.diag_embed(diagonal)
    rhs = (support_rows @ targets[:, :, None])[..., 0] + shrink * prior * valid
    return torch.linalg.solve(system, rhs) * valid


# number_rows: new number tokens keep fvt's digit-piece mean, as in the measured default (bench/RESULTS.md,
# "Default method"); least-squares weights over digits were not measured.
@register("fvt-ls", needs_donor=True, options=OPTIONS, number_rows=True)
def fvt_ls_init(ctx: InitContext) -> InitPlan:
    ctx.require_donor("fvt-ls")
    anchors = select_anchors(ctx, ctx.options["min_norm_ratio"])
    anchor_of_base = torch.full((len(ctx.base_vocab),), -1, dtype=torch.long)
    anchor_of_base[anchors.base_ids] = torch.arange(anchors.base_ids.numel())
    kinds, token_bytes = ctx.new_vocab.kinds, ctx.new_vocab.token_bytes
    new_ids = [i for i in ctx.alignment.unshared_new_ids.tolist() if kinds[i] is not TokenKind.SPECIAL
               and token_bytes[i]]
    pieces = segment_with_base(ctx.base_vocab, [token_bytes[i] for i in new_ids])
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
    flat = torch.tensor([b for p in pieces for b in p], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(pieces)), lengths)
    is_anchor = anchor_of_base[flat] >= 0 if flat.numel() else torch.zeros(0, dtype=torch.bool)
    missing = torch.zeros(len(pieces), dtype=torch.long).index_add_(0, owner, (~is_anchor).long())
    all_anchors = (missing == 0) & (lengths > 0)
    token_ids = torch.tensor(new_ids, dtype=torch.long)
    keep_fvt = ~all_anchors & (lengths > 0)  # a piece without a donor row: FVT's row
    fvt_pieces = keep_fvt[owner]
    rows += token_ids[owner[fvt_pieces]].tolist()
    cols += flat[fvt_pieces].tolist()
    vals += (1.0 / lengths[owner[fvt_pieces]].float()).tolist()
    fitted_idx = torch.nonzero(all_anchors, as_tuple=True)[0]
    donor = ctx.donor_input  # rows are gathered, then upcast: never a float32 copy of the whole donor matrix
    dictionary = donor[anchors.new_ids.to(donor.device)].float()
    ridge, neighbours, batch = ctx.options["ridge"], ctx.options["neighbours"], ctx.options["batch"]
    starts = torch.cumsum(lengths, 0) - lengths
    errors, error_ids = [], []
    for start in range(0, fitted_idx.numel(), batch):
        part = fitted_idx[start : start + batch]
        part_len = lengths[part]
        width = int(part_len.max())
        slot = torch.arange(width)
        valid = slot[None, :] < part_len[:, None]  # [b, width]
        gather = (starts[part][:, None] + slot[None, :]).clamp_max(max(flat.numel() - 1, 0))
        support = torch.where(valid, anchor_of_base[flat[gather]], torch.zeros_like(gather))
        prior = valid.float() / part_len[:, None].float()
        targets = donor[token_ids[part].to(donor.device)].float()
        if neighbours:
            _, near = cosine_topk(targets, dictionary, neighbours + width)
            near = near.cpu()
            fresh = ~(near[:, :, None] == torch.where(valid, support, -1)[:, None, :]).any(2)  # not a piece
            rank = torch.cumsum(fresh, 1)
            chosen = fresh & (rank <= neighbours)
            extra = torch.zeros(part.numel(), neighbours, dtype=torch.long)
            extra_valid = torch.zeros(part.numel(), neighbours, dtype=torch.bool)
            r, c = torch.nonzero(chosen, as_tuple=True)
            extra[r, rank[r, c] - 1] = near[r, c]
            extra_valid[r, rank[r, c] - 1] = True
            support = torch.cat([support, extra], 1)
            valid = torch.cat([valid, extra_valid], 1)
            prior = torch.cat([prior, torch.zeros(part.numel(), neighbours)], 1)
        support_rows = dictionary[support.to(donor.device)] * valid[..., None].to(donor.device)
        weights = ridge_weights(targets, support_rows, prior.to(donor.device), valid.to(donor.device), ridge)
        approx = (weights[..., None] * support_rows).sum(1)
        errors.append(((targets - approx).norm(dim=1) / targets.norm(dim=1).clamp_min(1e-12)).cpu())
        error_ids.append(token_ids[part])
        weights = weights.cpu()
        keep = valid & (weights != 0)
        rows += token_ids[part][:, None].expand_as(support)[keep].tolist()
        cols += anchors.base_ids[support[keep]].tolist()
        vals += weights[keep].tolist()
    fitted = fitted_idx.numel()
    kept_fvt = int(keep_fvt.sum())
    weights = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    built = set(token_ids[lengths > 0].tolist())
    unfilled = torch.tensor([i for i in ctx.alignment.unshared_new_ids.tolist() if i not in built],
                            dtype=torch.long)
    dense = mean_rows(unfilled, normal_base_ids(ctx.base_vocab)) if unfilled.numel() else None
    plan = InitPlan(weights, dense_rows=dense, notes={
        "anchors": int(anchors.new_ids.numel()), "fitted": int(fitted), "kept_fvt": kept_fvt,
        "mean_filled": int(unfilled.numel()), "ridge": ridge, "neighbours": neighbours,
        "reconstruction_error": torch.cat(errors) if errors else torch.empty(0)})
    wanted, gap = class_set(ctx.options["pursue"]), ctx.options["pursue_gap"]
    if not wanted and not gap:
        return plan
    ids = torch.cat(error_ids) if error_ids else torch.empty(0, dtype=torch.long)
    return with_pursuit(ctx, plan, wanted, gap, ids, dictionary)


def _rows_of(weights: torch.Tensor, take: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The triplets of sparse plan `weights` in the rows where `take` [V_new] is set."""
    weights = weights.coalesce()
    mine = take[weights.indices()[0]]
    return weights.indices()[0, mine], weights.indices()[1, mine], weights.values()[mine]


def near_an_anchor(ctx: InitContext, token_ids: torch.Tensor, anchor_rows: torch.Tensor,
                   min_cosine: float) -> torch.Tensor:
    """The `token_ids` whose donor input row has some anchor (`anchor_rows` [N, D], the donor rows fvt-ls
    fits over) at |cosine| >= `min_cosine` (estimated for many tokens). OMP rebuilds a row well almost only
    from atoms that point its way: of the SmolLM2 ← Gemma-3 tokens that pass `pursue_gap=0.4`, 96% have an
    anchor at |cosine| >= 0.55 and 90% at >= 0.6, while only 32% / 23% of all fitted tokens do — skipping the
    others' pursuit is where the time goes (bench/RESULTS.md, "Within three minutes, end to end")."""
    from transplant.solvers.nearest import max_abs_cosine

    donor = ctx.donor_input
    best = max_abs_cosine(donor[token_ids.to(donor.device)], anchor_rows)
    return token_ids[(best >= min_cosine).cpu()]


def with_pursuit(ctx: InitContext, plan: InitPlan, wanted: set[str], gap: float,
                 error_ids: torch.Tensor, anchor_rows: torch.Tensor) -> InitPlan:
    """Exact OMP's rows for the new tokens of the `wanted` classes (all classes when empty) — with `gap` > 0
    only where fvt-ls's donor-space reconstruction error exceeds OMP's by more than `gap` — and fvt-ls's rows
    for every other token (bench/RESULTS.md, "A default at the peak": no class separates the two methods; the
    error gap does). The pursuit runs only on the tokens of those classes."""
    from transplant.solvers.omp import omp
    from transplant.tokenizers.token_class import vocab_classes

    classes = vocab_classes(ctx.new_vocab)
    # With a gap only tokens fvt-ls fitted can switch (the others have no error to compare): pursue those.
    candidates = error_ids.tolist() if gap else text_targets(ctx).tolist()
    targets = torch.tensor([i for i in candidates if not wanted or classes[i] in wanted], dtype=torch.long)
    plan.notes["pursue_screened_out"] = 0
    if gap and targets.numel() and ctx.options["pursue_min_cosine"] > 0:
        before = int(targets.numel())
        targets = near_an_anchor(ctx, targets, anchor_rows, ctx.options["pursue_min_cosine"])
        plan.notes["pursue_screened_out"] = before - int(targets.numel())
    if not targets.numel():
        plan.notes["pursued"] = 0
        return plan
    k, rank = ctx.options["pursue_k"], ctx.options["pursue_screen"]

    def combine(target_rows: torch.Tensor, dictionary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if rank:
            return omp(target_rows, dictionary, k, prefilter=ctx.options["pursue_candidates"],
                       screen_rank=rank, progress=True)
        use_gram = target_rows.shape[0] * k > dictionary.shape[0]  # as `omp`: the Gram pays for many targets
        return omp(target_rows, dictionary, k, prefilter=None, gram_dtype="auto" if use_gram else None,
                   progress=True)

    pursued = donor_plan(ctx, "fvt-ls pursuit", combine, targets=targets)
    own_errors = plan.notes["reconstruction_error"]
    if gap:  # a token fvt-ls did not fit (a piece without a donor row) has no error: it keeps fvt-ls's row
        own = torch.full((len(ctx.new_vocab),), float("nan"))
        own[error_ids] = own_errors
        better = (own[targets] - pursued.notes["reconstruction_error"]) > gap
        pursued.notes["reconstruction_error"] = pursued.notes["reconstruction_error"][better]
        targets = targets[better]
    plan.notes["pursued"] = int(targets.numel())
    take = torch.zeros(len(ctx.new_vocab), dtype=torch.bool)
    take[targets] = True
    output = (None if pursued.output_weights is None
              else replace_rows(plan.input_weights, targets, *_rows_of(pursued.output_weights, take)))
    kept = ~take[error_ids] if own_errors.numel() else torch.zeros(0, dtype=torch.bool)
    notes = {**plan.notes, "pursue": "+".join(sorted(wanted)) or "all", "pursue_gap": gap, "pursue_k": k,
             "pursue_screen": rank,
             "reconstruction_error": torch.cat([own_errors[kept], pursued.notes["reconstruction_error"]])}
    cap = fvt_ls_reference(plan, targets, take) if ctx.options["pursue_prior_cap"] else None
    return InitPlan(replace_rows(plan.input_weights, targets, *_rows_of(pursued.input_weights, take)), output,
                    dense_rows=plan.dense_rows, notes=notes, prior_cap=cap)


def fvt_ls_reference(plan: InitPlan, targets: torch.Tensor, take: torch.Tensor) -> PriorCap:
    """fvt-ls's own plan rows of the pursued `targets` (`take`: the same ids as a [V_new] mask), as the
    references their logit prior is capped at."""
    position = torch.full((take.numel(),), -1, dtype=torch.long)
    position[targets] = torch.arange(targets.numel())

    def reference(weights: torch.Tensor) -> torch.Tensor:
        rows, cols, values = _rows_of(weights, take)
        return torch.sparse_coo_tensor(torch.stack([position[rows], cols]), values,
                                       (targets.numel(), weights.shape[1]), check_invariants=True).coalesce()

    return PriorCap(targets.clone(), reference(plan.input_weights),
                    None if plan.output_weights is None else reference(plan.output_weights))
