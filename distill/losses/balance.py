"""Combining a distillation loss with the student's own next-token CE.

A fixed weight (`loss.balance: sum`, `loss + ce_weight * ce`) is what the baselines' papers publish (ULD,
MinED). It is fragile for ALM: the chunk loss at temperature 100 and the CE differ in gradient scale by orders
of magnitude and the ratio drifts during training, so any fixed weight lets one of them vanish. The ALM
reference (tokenkit, tokenizer transfer: `losses=[sft, alm_unconstrained]`, `multitask_aggregation_fn=
approx_gradmag_preserve_mag`) instead weights every loss by the inverse of its gradient norm and renormalises
the weights to sum to one (GradMag), so each loss contributes the same gradient *direction* magnitude and the
combined step keeps the size of a single loss's step.

Where the norm is taken (`loss.gradmag_at`): `block` (as tokenkit) = the gradient with respect to the last
transformer block's trainable parameters (with LoRA: its adapters), reached from each loss's gradient at the
logits by one vector-Jacobian product through the output head and that block (`BlockProbe`); `logits`
(default) = the gradient at the student's logits, which needs no extra backward and exists under every ZeRO
stage (under ZeRO-3 the block's parameters are partitioned, so `block` falls back to it). Measured on the
smoke job, 3 seeds (bench/RESULTS.md, "Healing proven"): held-out gap closed and teacher disagreement are
equal to 0.002 and `block` costs ~1 s more per step (+20%), so `logits` is the default. A hidden-state term,
which does not pass through the logits, is not counted in its loss's norm either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

BALANCES = ("sum", "gradmag")
GRADMAG_AT = ("block", "logits")


def gradmag_weights(grad_norms: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[L] -> [L]: w_i = (1 / |g_i|) / sum_j (1 / |g_j|), detached; a loss with no gradient (|g_i| <= eps,
    e.g. no valid ALM chunk in the micro-batch) gets weight 0 and the others share the sum (all zero:
    uniform).

    With these weights sum_i w_i g_i = sum_i (g_i / |g_i|) / sum_j (1 / |g_j|): every loss's unit direction
    counts the same, and scaling all losses by c scales the result by c (so global item counts under gradient
    accumulation keep their meaning). Two losses: w = [|g_2|, |g_1|] / (|g_1| + |g_2|).
    """
    norms = grad_norms.detach().float()
    inverse = torch.where(norms > eps, 1.0 / norms.clamp(min=eps), torch.zeros_like(norms))
    total = inverse.sum()
    return torch.where(total > 0, inverse / total.clamp(min=eps), torch.full_like(norms, 1.0 / len(norms)))


class BlockProbe:
    """Gradient norms at the student's last transformer block (GradMag's `block` mode, as the reference).

    DeepSpeed hooks every output of its engine and refuses any backward through them but its own, so the probe
    never touches the engine's graph: a forward pre-hook keeps the last block's inputs, and `norms` re-runs
    that block, the final norm and the output head on a detached copy of its hidden-state input (one block and
    one head matmul of extra forward), then takes each loss's vector-Jacobian product from its gradient at the
    logits to the block's trainable parameters. `check` compares the re-run logits with the engine's once: a
    model whose head is not `lm_head(norm(block(h)))` (e.g. logit soft-capping) is reported by the caller."""

    def __init__(self, model: torch.nn.Module):
        blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0), None)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.block = blocks[-1] if blocks is not None else None
        self.norm = getattr(decoder, "norm", None)
        self.head = model.get_output_embeddings()
        self.params = ([p for p in self.block.parameters() if p.requires_grad]
                       if self.block is not None else [])
        self.inputs: tuple[tuple, dict] | None = None
        self.checked = self.failed = False  # re-run compared with the engine's logits once; it differed
        if self.usable:
            self.block.register_forward_pre_hook(self._capture, with_kwargs=True)

    @property
    def usable(self) -> bool:
        return bool(self.params) and self.norm is not None and self.head is not None

    def _capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            self.inputs = (args, kwargs)

    def logits(self) -> torch.Tensor:
        """The student's logits recomputed from the last block's (detached) input."""
        args, kwargs = self.inputs
        if args:
            args = (args[0].detach(), *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
        out = self.block(*args, **kwargs)
        return self.head(self.norm(out[0] if isinstance(out, tuple) else out))

    def check(self, logits: torch.Tensor, reference: torch.Tensor) -> bool:
        scale = reference.detach().float().abs().max().clamp(min=1.0)
        return bool(((logits.detach().float() - reference.detach().float()).abs().max() / scale) < 1e-3)

    def norm_function(self, reference: torch.Tensor) -> Callable[[list[torch.Tensor]], torch.Tensor] | None:
        """GradMag's norm function for this micro-batch, whose engine logits are `reference`; None once the
        re-run has failed to reproduce them (checked on the first call, warned once: norms at the logits)."""
        if self.failed:
            return None
        recomputed = self.logits()
        if not self.checked:
            self.checked = True
            if not self.check(recomputed, reference):
                log.warning("the last block's re-run does not reproduce the logits: GradMag takes norms at "
                            "the logits")
                self.failed = True
                return None
        return lambda grads: self.norms(grads, recomputed)

    def norms(self, grads_at_logits: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """[L]: |d loss_i / d block parameters| from each loss's gradient at the logits."""
        norms = []
        for grad in grads_at_logits:
            vjp = torch.autograd.grad(logits, self.params, grad_outputs=grad.to(logits.dtype),
                                      retain_graph=True, allow_unused=True)
            norms.append(torch.sqrt(sum((g.float().square().sum() for g in vjp if g is not None),
                                        torch.zeros((), device=logits.device))))
        return torch.stack(norms)


def block_probe(model: torch.nn.Module, where: str, zero_stage: int, uses_gradmag: bool) -> BlockProbe | None:
    """Where GradMag measures gradient norms: a `BlockProbe` on `model`'s last transformer block's trainable
    parameters (`loss.gradmag_at: block`, as the reference); None = at the logits (asked for, GradMag not in
    use, or under ZeRO-3, whose partitioned parameters have no full gradient to take a norm of)."""
    if where not in GRADMAG_AT:
        raise TransplantError(f"loss.gradmag_at={where!r} is unknown; use one of {', '.join(GRADMAG_AT)}")
    if where == "logits" or zero_stage == 3 or not uses_gradmag:
        return None
    probe = BlockProbe(model)
    if not probe.usable:
        log.warning("no trainable last block with a final norm and head: GradMag takes norms at the logits")
        return None
    return probe


def balanced_step(losses: list[torch.Tensor], leaves: list[torch.Tensor], outputs: list[torch.Tensor],
                  through_losses: bool = False,
                  norms_from: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(surrogate, value, w [L]): the GradMag combination of `losses`, as a scalar to backpropagate.

    The losses are computed on `leaves`: detached copies (`requires_grad_()`) of the model's `outputs` (its
    logits, and hidden states where a loss reads them). Each loss's gradient with respect to the leaves is
    taken once (no pass through the model), weighted by `gradmag_weights`, and the combined gradient G is
    handed to the model as `surrogate = sum(output * G)`, whose backward through the model equals that of
    sum_i w_i loss_i. This keeps the probe out of the model's graph: DeepSpeed hooks every engine output and
    refuses a second backward through it. `value` is sum_i w_i loss_i (detached), for logging.
    `through_losses` adds sum_i w_i loss_i itself to the surrogate, for losses that also read outputs left
    attached (ALM's hidden-state term) or own trainable parameters (its projection): that backward runs inside
    the real one (so ZeRO-3 gathers those parameters once) and stops at the detached leaves; the probe never
    enters it, since `autograd.grad` runs only the part of the graph that leads to the leaves. `norms_from`
    (gradients at the first leaf, one per loss -> [L] norms; `BlockProbe.norms` for `gradmag_at: block`) takes
    the norms elsewhere; the combined gradient still enters at the outputs, so only the weighting changes.
    """
    grads = [torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True) for loss in losses]
    grads = [[torch.zeros_like(leaf) if g is None else g for g, leaf in zip(per_loss, leaves)]
             for per_loss in grads]
    if norms_from is not None:
        norms = norms_from([per_loss[0] for per_loss in grads])
    else:
        norms = torch.stack([torch.sqrt(sum(g.float().square().sum() for g in per_loss))
                             for per_loss in grads])
    weights = gradmag_weights(norms)
    surrogate = sum((output * sum(w.to(g[i].dtype) * g[i] for w, g in zip(weights, grads)).detach()).sum()
                    for i, output in enumerate(outputs))
    value = sum(w * loss.detach() for w, loss in zip(weights, losses))
    if through_losses:
        surrogate = surrogate + sum(w * loss for w, loss in zip(weights, losses))
    return surrogate, value, weights
