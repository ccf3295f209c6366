"""report.png for every method: how the new tokens were built, and how well where that is measurable.

Every method's plan is a sparse matrix (docs/design.md §2), so the number of base pieces per new token is
always known and says how each row was made (1: a copy, many: a mixture); donor methods also measure a
reconstruction error in the donor space, plotted beside it.
"""

from __future__ import annotations

import io

import torch

from transplant.init.base import InitPlan


def pieces_per_token(plan: InitPlan, new_ids: torch.Tensor | list[int]) -> torch.Tensor:
    """Non-zero base rows behind each of `new_ids` in the input plan (0 for dense-only rows)."""
    weights = plan.input_weights.coalesce()
    rows = weights.indices()[0]
    counts = torch.bincount(rows, minlength=weights.shape[0])
    ids = torch.as_tensor(new_ids, dtype=torch.long)
    return counts[ids] if ids.numel() else ids


def render_report_plot(plan: InitPlan, new_ids: torch.Tensor | list[int]) -> bytes | None:
    """PNG with the pieces-per-new-token histogram and, where present, the reconstruction-error histogram;
    None when matplotlib is missing or there is nothing to plot."""
    counts = pieces_per_token(plan, new_ids)
    errors = plan.notes.get("reconstruction_error")
    has_errors = isinstance(errors, torch.Tensor) and errors.numel() > 0
    if counts.numel() == 0 and not has_errors:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = (counts.numel() > 0) + has_errors
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.5), squeeze=False)
    axes = list(axes[0])
    if counts.numel():
        ax = axes.pop(0)
        top = int(counts.max())
        ax.hist(counts.numpy(), bins=range(0, top + 2), color="#4f8a4f", align="left")
        ax.set_xlabel("base pieces per new token (0: not a mix of base rows)")
        ax.set_ylabel("new tokens")
        ax.set_title(f"{counts.numel()} new tokens, median {float(counts.float().median()):.0f} pieces")
    if has_errors:
        ax = axes.pop(0)
        ax.hist(errors.float().cpu().numpy(), bins=60, color="#3b6ea8")
        ax.set_xlabel("relative reconstruction error in the donor space")
        ax.set_ylabel("new tokens")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
