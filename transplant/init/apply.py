"""From an initializer's plan to the new embedding matrices: number rows, the tie decision, repairs.

The one path from `InitPlan` to tensors (`transplant.pipeline.new_embeddings` calls it, and the benches call
that), so what is measured is what users get. A tied base stays tied unless the user asks (`--set
untie=true`): a donor with its own lm_head used to untie a tied base silently, doubling the embedding
parameters for a gain nobody had measured (bench/RESULTS.md, "Unreachable rows and fidelity fixes").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from transplant.init.base import InitContext, InitPlan, build_embedding
from transplant.init.numbers import compose_number_rows
from transplant.init.registry import ResolvedMethod
from transplant.init.repair import repair_rows


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
    plan.notes["repairs"] = repair_rows(ctx, new_input, new_output, method.options)
    return new_input, new_output, plan
