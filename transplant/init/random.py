"""`random`: new rows drawn from a Gaussian with the base rows' mean and full covariance.

HF's `resize_token_embeddings` draws new rows almost identically (std ~6e-4); matching the real covariance
keeps new tokens as spread out as the old ones, which is what a randomly-initialised baseline should mean.
"""

from __future__ import annotations

import torch

from transplant.init.base import InitContext, InitPlan, copy_shared, normal_base_ids, sparse_rows
from transplant.init.registry import Option, register


def gaussian_like(base_rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` samples from N(mean, cov) of `base_rows`, reproducible for a seed on any device."""
    rows = base_rows.double()
    mean = rows.mean(0)
    centered = rows - mean
    cov = centered.T @ centered / max(rows.shape[0] - 1, 1)
    jitter = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
    chol = torch.linalg.cholesky(cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(n, cov.shape[0], generator=generator, dtype=torch.float64).to(cov.device)
    return (mean + noise @ chol.T).float()


@register("random", options=(Option("seed", int, 0, "random seed of the draws"),))
def random_init(ctx: InitContext) -> InitPlan:
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    weights = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    new_ids = ctx.alignment.unshared_new_ids
    population = normal_base_ids(ctx.base_vocab)
    seed = ctx.options["seed"]

    def dense(role: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offset = 0 if role == "input" else 1  # input and output draws are independent
        return new_ids, gaussian_like(base[population.to(base.device)], int(new_ids.numel()), seed + offset)

    return InitPlan(weights, dense_rows=dense, notes={"seed": seed})
