"""`knn`: a new token is the softmax-weighted mean of its k most similar donor-space anchors (WECHSEL-like).

Cheap and robust; weaker than OMP where a token is a composition of a few others rather than a neighbour.
"""

from __future__ import annotations

import torch

from transplant.init.base import InitContext, InitPlan
from transplant.init.donor import cosine_topk, donor_plan, in_batches
from transplant.init.registry import Option, register

OPTIONS = (
    Option("k", int, 8, "nearest anchors per new token", min=1),
    Option("temperature", float, 0.1, "softmax temperature over cosine similarities", min=1e-6),
)


def knn_weights(targets: torch.Tensor, dictionary: torch.Tensor, k: int, temperature: float):
    """Top-k anchors by cosine similarity and softmax(similarity / temperature) weights."""
    top, pos = cosine_topk(targets, dictionary, k)
    return pos, torch.softmax(top / temperature, dim=1)


@register("knn", needs_donor=True, options=OPTIONS)
def knn_init(ctx: InitContext) -> InitPlan:
    k, temperature = ctx.options["k"], ctx.options["temperature"]
    return donor_plan(ctx, "knn", in_batches(lambda t, d: knn_weights(t, d, k, temperature), desc="knn"),
                      notes={"k": k, "temperature": temperature})
