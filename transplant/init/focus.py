"""`focus`: FOCUS-style weights — sparsemax over the similarities to the most similar anchors in the donor space.

FOCUS (Dobler & de Melo, 2023) uses auxiliary fastText embeddings to find overlapping tokens similar to a new
one; with a donor model we have a better similarity space already. Sparsemax gives a convex combination that is
exactly zero outside a few anchors, so each row stays interpretable. Similarities are restricted to the top-M
anchors first (one GEMM + topk) to keep memory bounded.
"""

from __future__ import annotations

import torch

from transplant.init.base import InitContext, InitPlan
from transplant.init.donor import cosine_topk, donor_plan, in_batches
from transplant.init.registry import register


def sparsemax(scores: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex (Martins & Astudillo, 2016)."""
    sorted_scores, _ = scores.sort(dim=-1, descending=True)
    cumsum = sorted_scores.cumsum(dim=-1)
    ks = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=scores.dtype)
    support = 1 + ks * sorted_scores > cumsum
    k_star = support.sum(dim=-1, keepdim=True)
    tau = (cumsum.gather(-1, k_star - 1) - 1) / k_star.to(scores.dtype)
    return (scores - tau).clamp_min(0)


def focus_weights(targets: torch.Tensor, dictionary: torch.Tensor, top_m: int, temperature: float):
    top, pos = cosine_topk(targets, dictionary, top_m)
    return pos, sparsemax(top / temperature)


@register("focus", needs_donor=True)
def focus_init(ctx: InitContext) -> InitPlan:
    top_m = int(ctx.options.get("top_m", 64))
    temperature = float(ctx.options.get("temperature", 0.1))
    return donor_plan(ctx, "focus", in_batches(lambda t, d: focus_weights(t, d, top_m, temperature), desc="focus"),
                      notes={"top_m": top_m, "temperature": temperature})
