"""From an initializer's plan to the new embedding matrices: number rows, the tie decision, repairs.

The one path from `InitPlan` to tensors (`transplant.pipeline.new_embeddings` calls it, and the benches call
that), so what is measured is what users get. A tied base stays tied unless the user asks (`--set
untie=true`): a donor with its own lm_head used to untie a tied base silently, doubling the embedding
parameters for a gain nobody had measured (bench/RESULTS.md, "Unreachable rows and fidelity fixes").
"""

from __future__ import annotations

import torch

from transplant.init.base import InitContext, InitPlan, build_embedding
from transplant.init.numbers import compose_number_rows, number_rows_default
from transplant.init.repair import repair_rows


def keeps_separate_output(ctx: InitContext) -> bool:
    """Whether the new model has its own output matrix: the base has one, or the user asked to untie."""
    return ctx.base_output is not None or bool(ctx.options.get("untie", False))


def finish_embeddings(ctx: InitContext, plan: InitPlan,
                      method: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None, InitPlan]:
    """(new input [V_new, D], new output or None when tied, the plan), float32, after the pipeline's steps.

    `numbers` unset (None) takes `method`'s declared default (`numbers.number_rows_default`). What the repairs
    changed is in `plan.notes["repairs"]` (a `RepairSummary`; the report lists it).
    """
    separate = keeps_separate_output(ctx)
    numbers = ctx.options.get("numbers")
    if numbers is None:
        numbers = method is not None and number_rows_default(method)
    plan.notes["number_rows"] = bool(numbers)
    if numbers:
        plan = compose_number_rows(plan, ctx)
    new_input = build_embedding(plan, "input", ctx.base_input)
    new_output = None
    if separate:
        base_out = ctx.base_output if ctx.base_output is not None else ctx.base_input
        new_output = build_embedding(plan, "output", base_out)
    plan.notes["repairs"] = repair_rows(ctx, new_input, new_output, ctx.options)
    return new_input, new_output, plan
