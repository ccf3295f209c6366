"""`sparsemax-knn`: sparsemax over the similarities to the most similar anchors in the donor space.

A donor-model variant of FOCUS's weighting (the method named `focus` up to 0.x): FOCUS (Dobler & de Melo,
2023) compares tokens in an auxiliary fastText space because it has no donor model; when the donor's own
embeddings are available they are a better similarity space already. Sparsemax gives a convex combination that
is exactly zero outside a few anchors, so each row stays interpretable. Similarities are restricted to the
top-M anchors first (one GEMM + topk) to keep memory bounded, and sharpened by a low temperature (median
support ~4).
"""

from __future__ import annotations

import torch

from transplant.init.base import InitContext, InitPlan
from transplant.init.donor import cosine_topk, donor_plan, in_batches
from transplant.init.registry import Option, register
from transplant.solvers.sparsemax import sparsemax

OPTIONS = (
    Option("top_m", int, 64, "candidate anchors per new token (most similar in the donor space)", min=1),
    Option("temperature", float, 0.1, "similarity temperature before sparsemax (lower: sparser)", min=1e-6),
)


def sparsemax_knn_weights(targets: torch.Tensor, dictionary: torch.Tensor, top_m: int,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor positions [B, m], sparsemax weights [B, m]) over each target's top-m cosine neighbours."""
    top, pos = cosine_topk(targets, dictionary, top_m)
    return pos, sparsemax(top / temperature)


@register("sparsemax-knn", needs_donor=True, options=OPTIONS)
def sparsemax_knn_init(ctx: InitContext) -> InitPlan:
    top_m, temperature = ctx.options["top_m"], ctx.options["temperature"]
    combine = in_batches(lambda t, d: sparsemax_knn_weights(t, d, top_m, temperature), desc="sparsemax-knn")
    return donor_plan(ctx, "sparsemax-knn", combine, notes={"top_m": top_m, "temperature": temperature})
