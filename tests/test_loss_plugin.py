"""Adding a loss is one new module: a function plus one `register` call, and the real trainer runs it.

The throwaway loss below is registered from this test module (as a user's own module would), declares a
per-pair table through `prepare`, which of its metrics are sums, and an option; the trainer is told nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from distill.losses import LOSSES, get_loss, loss_options, register
from distill.losses.common import alm_valid_chunks, chunk_sums, normalise, token_logprobs
from tests.test_trainer import make_recipe, run_in_process, weights
from transplant.errors import TransplantError

NAME = "test-chunk-rate"


def chunk_rate_loss(batch: Mapping[str, Any], *, num_items: float | None = None,
                    scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Squared gap between teacher and student log-likelihood per byte of each chunk (a toy plug-in).

    Reads `token_bytes` (long [Vs], bytes per student token) from its `prepare` hook."""
    a = batch["alignment"]
    teacher = chunk_sums(token_logprobs(batch["teacher_logits"].detach(), a.teacher_input_ids),
                         a.teacher_chunk_index, a.num_chunks)
    student = chunk_sums(token_logprobs(batch["student_logits"], a.student_input_ids),
                         a.student_chunk_index, a.num_chunks)
    nbytes = chunk_sums(batch["token_bytes"][a.student_input_ids].to(student.dtype), a.student_chunk_index,
                        a.num_chunks).clamp(min=1)
    valid = alm_valid_chunks(a)
    count = valid.sum()
    loss = normalise(scale * (((teacher - student) / nbytes) ** 2 * valid).sum(), count, num_items)
    chunks = count.detach().float()
    return loss, {"loss": loss.detach(), "chunk_rate": loss.detach(), "num_items_local": count.detach(),
                  "chunks": chunks, "chunks_per_micro_batch": chunks}


@pytest.fixture
def plugin_loss():
    register(NAME, count_items=lambda batch: int(alm_valid_chunks(batch["alignment"]).sum()),
             sum_metrics=("chunk_rate", "chunks"),
             prepare=lambda ctx: {"token_bytes": torch.tensor([len(b) for b in ctx.student_vocab.token_bytes])}
             )(chunk_rate_loss)
    yield get_loss(NAME)
    LOSSES.pop(NAME)  # the registry is process-wide: leave it as the other tests expect it


def test_a_registered_loss_runs_through_the_trainer(tmp_path, tiny_pair, plugin_loss):
    recipe = make_recipe(tmp_path, tiny_pair, "plugin", train={"steps": 2, "grad_accum": 2},
                         loss={"name": NAME, "options": {NAME: {"scale": 2.0}}})
    trainer, result = run_in_process(recipe)
    assert trainer.teacher is not None and trainer.loss is plugin_loss and trainer.loss_options == {"scale": 2.0}
    assert trainer.loss_extras["token_bytes"].shape == (len(trainer.student_vocab),)  # from prepare, per pair
    steps = [r for r in result["history"] if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert 0 < record["loss"] == record["chunk_rate"] and torch.isfinite(torch.tensor(record["loss"]))
        # declared sums add up over the two micro-batches to the global count; the rest is averaged
        assert record["chunks"] == record["num_items_local"] == record["num_items"] > 0
        assert record["chunks_per_micro_batch"] == record["num_items"] / 2
    before, after = load_file(tiny_pair["donor_model"] / "model.safetensors"), weights(recipe["output_dir"])
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_plugin_options_are_checked(plugin_loss):
    assert plugin_loss.options == ("scale",)
    with pytest.raises(TransplantError, match=f"loss.options.{NAME}.scal is not an option of loss .*it takes: scale"):
        loss_options(NAME, {NAME: {"scal": 2.0}})


def test_duplicate_registration_is_an_error(plugin_loss):
    def other(batch, *, num_items=None):
        raise AssertionError("never registered, never called")

    for name in (NAME, "alm"):
        with pytest.raises(TransplantError, match=f"loss '{name}' is registered twice .*rename one of them"):
            register(name, count_items=lambda batch: 0)(other)
    assert get_loss(NAME) is plugin_loss and get_loss("alm").fn.__name__ == "alm_loss"
