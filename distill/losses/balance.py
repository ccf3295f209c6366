"""Combining a distillation loss with the student's own next-token CE.

A fixed weight (`loss.balance: sum`, `loss + ce_weight * ce`) is what the baselines' papers publish (ULD, MinED).
It is fragile for ALM: the chunk loss at temperature 100 and the CE differ in gradient scale by orders of
magnitude and the ratio drifts during training, so any fixed weight lets one of them vanish. The ALM reference
(tokenkit, tokenizer transfer: `losses=[sft, alm_unconstrained]`, `multitask_aggregation_fn=
approx_gradmag_preserve_mag`) instead weights every loss by the inverse of its gradient norm and renormalises
the weights to sum to one (GradMag), so each loss contributes the same gradient *direction* magnitude and the
combined step keeps the size of a single loss's step.

Where the norm is taken: tokenkit differentiates with respect to the last transformer block's parameters; here
it is the student's logits: they exist under every ZeRO stage and with LoRA, and each loss's gradient there
costs only that loss's own backward (a hidden-state term, which does not pass through the logits, is not
counted in its loss's norm).
"""

from __future__ import annotations

import torch

BALANCES = ("sum", "gradmag")


def gradmag_weights(grad_norms: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[L] -> [L]: w_i = (1 / |g_i|) / sum_j (1 / |g_j|), detached; a loss with no gradient (|g_i| <= eps, e.g.
    no valid ALM chunk in the micro-batch) gets weight 0 and the others share the sum (all zero: uniform).

    With these weights sum_i w_i g_i = sum_i (g_i / |g_i|) / sum_j (1 / |g_j|): every loss's unit direction counts
    the same, and scaling all losses by c scales the result by c (so global item counts under gradient
    accumulation keep their meaning). Two losses: w = [|g_2|, |g_1|] / (|g_1| + |g_2|).
    """
    norms = grad_norms.detach().float()
    inverse = torch.where(norms > eps, 1.0 / norms.clamp(min=eps), torch.zeros_like(norms))
    total = inverse.sum()
    return torch.where(total > 0, inverse / total.clamp(min=eps), torch.full_like(norms, 1.0 / len(norms)))


def balanced_step(losses: list[torch.Tensor], leaves: list[torch.Tensor], outputs: list[torch.Tensor],
                  through_losses: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(surrogate, value, w [L]): the GradMag combination of `losses`, as a scalar to backpropagate.

    The losses are computed on `leaves`: detached copies (`requires_grad_()`) of the model's `outputs` (its
    logits, and hidden states where a loss reads them). Each loss's gradient with respect to the leaves is taken
    once (no pass through the model), weighted by `gradmag_weights`, and the combined gradient G is handed to the
    model as `surrogate = sum(output * G)`, whose backward through the model equals that of sum_i w_i loss_i.
    This keeps the probe out of the model's graph: DeepSpeed hooks every engine output and refuses a second
    backward through it. `value` is sum_i w_i loss_i (detached), for logging. `through_losses` adds
    sum_i w_i loss_i itself to the surrogate, for losses that also read outputs left attached (ALM's hidden-state
    term) or own trainable parameters (its projection): that backward runs inside the real one (so ZeRO-3
    gathers those parameters once) and stops at the detached leaves; the probe never enters it, since
    `autograd.grad` runs only the part of the graph that leads to the leaves.
    """
    grads = [torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True) for loss in losses]
    grads = [[torch.zeros_like(leaf) if g is None else g for g, leaf in zip(per_loss, leaves)] for per_loss in grads]
    norms = torch.stack([torch.sqrt(sum(g.float().square().sum() for g in per_loss)) for per_loss in grads])
    weights = gradmag_weights(norms)
    surrogate = sum((output * sum(w.to(g[i].dtype) * g[i] for w, g in zip(weights, grads)).detach()).sum()
                    for i, output in enumerate(outputs))
    value = sum(w * loss.detach() for w, loss in zip(weights, losses))
    if through_losses:
        surrogate = surrogate + sum(w * loss for w, loss in zip(weights, losses))
    return surrogate, value, weights
