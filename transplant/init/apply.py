"""From an initializer's plan to the new embedding matrices: number rows, the tie decision, repairs.

The one path from `InitPlan` to tensors (`transplant.pipeline.new_embeddings` calls it, and the benches call
that), so what is measured is what users get. A tied base stays tied unless the user asks (`--set
untie=true`): a donor with its own lm_head used to untie a tied base silently, doubling the embedding
parameters for a gain nobody had measured (bench/RESULTS.md, "Unreachable rows and fidelity fixes").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from transplant.init.base import InitContext, InitPlan, apply_plan_matrix, build_embedding
from transplant.init.logit_prior import cap_logit_prior, logit_prior_direction, start_token
from transplant.init.numbers import compose_number_rows
from transplant.init.registry import ResolvedMethod
from transplant.init.repair import repair_rows

log = logging.getLogger(__name__)


def keeps_separate_output(ctx: InitContext, options: Mapping[str, Any]) -> bool:
    """Whether the new model has its own output matrix: the base has one, or the user asked to untie."""
    return ctx.base_output is not None or bool(options["untie"])


def finish_embeddings(ctx: InitContext, plan: InitPlan,
                      method: ResolvedMethod) -> tuple[torch.Tensor, torch.Tensor | None, InitPlan]:
    """(new input [V_new, D], new output or None when tied, the plan), float32, after the pipeline's steps,
    as `method`'s options say (its `number_rows` holds `--set numbers` or the method's declared default).
    What the repairs changed is in `plan.notes["repairs"]` (a `RepairSummary`; the report lists it).
    """
    separate = keeps_separate_output(ctx, method.options)
    plan.notes["number_rows"] = method.number_rows
    if method.number_rows:
        plan = compose_number_rows(plan, ctx)
    new_input = build_embedding(plan, "input", ctx.base_input)
    new_output = None
    if separate:
        base_out = ctx.base_output if ctx.base_output is not None else ctx.base_input
        new_output = build_embedding(plan, "output", base_out)
    if plan.prior_cap is not None:  # the logits' side: the output rows, or the tied ones
        plan.notes.update(cap_priors(ctx, plan, new_input if new_output is None else new_output,
                                     "input" if new_output is None else "output"))
    plan.notes["repairs"] = repair_rows(ctx, new_input, new_output, method.options)
    return new_input, new_output, plan


def cap_priors(ctx: InitContext, plan: InitPlan, rows: torch.Tensor, role: str) -> dict[str, Any]:
    """Cap, in place, the logit prior of `plan.prior_cap`'s rows of `rows` (the new `role` matrix) at their
    reference rows' (transplant/init/logit_prior.py); notes for the report. Without the base model (or a
    start token to sample from) the rows stay as built and the notes say why."""
    cap = plan.prior_cap
    mu, why = logit_prior_direction(ctx.base_model_dir, start_token(ctx.base_vocab.roles), device=ctx.device,
                                    trust_remote_code=ctx.trust_remote_code)
    if mu is None:
        log.warning("%d rebuilt rows keep their logit prior uncapped: %s", int(cap.ids.numel()), why)
        return {"prior_cap": f"skipped: {why}"}
    weights = cap.input_weights if role == "input" or cap.output_weights is None else cap.output_weights
    base = ctx.base_output if role == "output" and ctx.base_output is not None else ctx.base_input
    reference = apply_plan_matrix(weights, base).to(rows.device)
    ids = cap.ids.to(rows.device)
    before = rows[ids]
    rows[ids] = cap_logit_prior(before, reference, mu.to(rows.device))
    lowered = int(((rows[ids] - before).norm(dim=1) > 1e-6 * before.norm(dim=1)).sum())  # not rounding
    log.info("logit prior capped on %d of %d rebuilt rows", lowered, int(ids.numel()))
    return {"prior_cap": "fvt-ls", "prior_capped": lowered}
