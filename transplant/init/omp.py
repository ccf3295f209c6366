"""`omp`: Orthogonal Matching Pursuit tokenizer transplantation (the default when a donor model is given).

Each new token's donor embedding is approximated by k anchor tokens (shared by both vocabularies) with least
squares on the greedily chosen set; the same coefficients applied to the anchors' base rows give its base row.
Input and output embeddings are solved separately when the donor has its own lm_head, since the two spaces differ.
"""

from __future__ import annotations

from transplant.init.base import InitContext, InitPlan
from transplant.init.donor import donor_plan
from transplant.init.registry import register


@register("omp", needs_donor=True)
def omp_init(ctx: InitContext) -> InitPlan:
    from transplant.solvers.omp import omp

    k = int(ctx.options.get("k", 64))
    prefilter = ctx.options.get("prefilter")
    prefilter = int(prefilter) if prefilter else None
    def combine(targets, dictionary):
        # the Gram matrix costs N²·D/2 once; pursuit without it costs B·k·N·D: build it only when that is more
        use_gram = targets.shape[0] * k > dictionary.shape[0]
        return omp(targets, dictionary, k, prefilter=prefilter, gram_dtype="auto" if use_gram else None,
                   progress=True)

    return donor_plan(ctx, "omp", combine,
                      notes={"k": k, "prefilter": prefilter})
