"""`omp`: Orthogonal Matching Pursuit tokenizer transplantation (mergekit-tokensurgeon's method).

Each new token's donor embedding is approximated by k anchor tokens (shared by both vocabularies) with least
squares on the greedily chosen set; the same coefficients applied to the anchors' base rows give its base row.
Input and output embeddings are solved separately when the donor has its own lm_head, since the two spaces
differ.

`prefilter` (option): `auto` (default) pursues inside each target's 1024 most correlated anchors (re-chosen as
the residual changes) when that pays off: on CPU for k > 16 over more than 4096 anchors. Exact Batch-OMP costs
N·k²/2 bandwidth-bound reads per target: for a 200k-token vocabulary at k=64 that is hours of 2-core CPU,
while the refreshed prefilter measures the same held-out BPB as exact OMP (bench/RESULTS.md, "OMP solver" and
the mergekit section). On a GPU the exact pursuit is kept. With a donor model the default method is `fvt-ls`,
which measured better than OMP on the large direction (bench/RESULTS.md, "Default method"). `prefilter=0`
forces exact OMP anywhere; `prefilter=M` sets the candidate count.
"""

from __future__ import annotations

from transplant.init.base import InitContext, InitPlan
from transplant.init.donor import donor_plan
from transplant.init.registry import Option, register
from transplant.io.memory import check_fits, omp_bytes


def parse_prefilter(value: object) -> str | int:
    """`auto`, or a candidate count (0 / exact / none: exact pursuit)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("", "none", "exact", "false"):
        return 0
    if not text.isdigit():
        raise ValueError("prefilter must be auto, 0 (exact) or a positive candidate count")
    return int(text)


OPTIONS = (
    Option("k", int, 64, "anchors per new token (sparsity of each row)", min=1, max=4096),
    Option("prefilter", str, "auto", "auto, 0 (exact pursuit) or a candidate count M per target",
           parse=parse_prefilter, metavar="auto|M"),
    Option("screen", str, "none",
           "exact pursuit with bf16-screened correlations and an fp32 certificate (meant for GPUs; slower "
           "than the Gram path on CPU, not yet timed on a GPU)", choices=("none", "bf16")),
)


@register("omp", needs_donor=True, options=OPTIONS)
def omp_init(ctx: InitContext) -> InitPlan:
    import torch

    from transplant.solvers.omp import omp

    k = ctx.options["k"]
    option = ctx.options["prefilter"]
    used: list[int | None] = []  # per solver call (input, output)

    def combine(targets, dictionary):
        prefilter = resolve_prefilter(option, k, dictionary.shape[0], str(ctx.device))
        check_fits(omp_bytes(targets.shape[0], dictionary.shape[0], dictionary.shape[1],
                             min(k, dictionary.shape[0])),
                   what=f"OMP for {targets.shape[0]} new tokens over {dictionary.shape[0]} anchors at k={k}",
                   fix="use a smaller --set k", device=ctx.device)
        used.append(prefilter)
        # the Gram matrix costs N²·D/2 once; pursuit without it costs B·k·N·D: build it only when that is more
        use_gram = targets.shape[0] * k > dictionary.shape[0]
        screen = torch.bfloat16 if ctx.options["screen"] == "bf16" else None
        return omp(targets, dictionary, k, prefilter=prefilter, gram_dtype="auto" if use_gram else None,
                   screen_dtype=screen, progress=True)

    plan = donor_plan(ctx, "omp", combine, notes={"k": k, "prefilter": option})
    if option == "auto" and used:
        plan.notes["prefilter"] = f"auto: {used[0] or 'exact'}"
    return plan


AUTO_CANDIDATES = 1024


def resolve_prefilter(option: str | int, k: int, n_anchors: int, device: str) -> int | None:
    """The candidate count M for the solver (None: exact), from the `prefilter` option as its `Option` parsed
    it (`auto` or a count, 0 = exact)."""
    if option == "auto":
        wide = n_anchors > 4 * AUTO_CANDIDATES
        return AUTO_CANDIDATES if device.startswith("cpu") and k > 16 and wide else None
    return int(option) or None
