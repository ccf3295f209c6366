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
from transplant.init.registry import Option, register
from transplant.solvers.sparsemax import sparsemax

OPTIONS = (
    Option("top_m", int, 64, "candidate anchors per new token (most similar in the donor space)", min=1),
    Option("temperature", float, 0.1, "similarity temperature before sparsemax (lower: sparser)", min=1e-6),
)


def focus_weights(targets: torch.Tensor, dictionary: torch.Tensor, top_m: int, temperature: float):
    top, pos = cosine_topk(targets, dictionary, top_m)
    return pos, sparsemax(top / temperature)


@register("focus", needs_donor=True, options=OPTIONS)
def focus_init(ctx: InitContext) -> InitPlan:
    top_m, temperature = ctx.options["top_m"], ctx.options["temperature"]
    return donor_plan(ctx, "focus", in_batches(lambda t, d: focus_weights(t, d, top_m, temperature), desc="focus"),
                      notes={"top_m": top_m, "temperature": temperature})
