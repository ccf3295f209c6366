"""The logit-prior cap on rebuilt rows: a pure function, fvt-ls's references, the pipeline step."""

from __future__ import annotations

import torch

from tests.test_fvt_ls import PLAIN, _pair
from transplant.init.apply import finish_embeddings
from transplant.init.base import InitContext, build_embedding
from transplant.init.logit_prior import cap_logit_prior, logit_prior_direction, mean_final_hidden
from transplant.init.registry import get_initializer, resolve_method
from transplant.tokenizers.align import align


def test_cap_lowers_only_the_component_along_mu_and_only_where_it_exceeds_the_reference():
    mu = torch.tensor([2.0, 0.0, 0.0])
    rows = torch.tensor([[5.0, 1.0, -1.0], [0.5, 3.0, 2.0]])
    reference = torch.tensor([[1.0, 7.0, 7.0], [4.0, 0.0, 0.0]])
    capped = cap_logit_prior(rows, reference, mu)
    # row 0: prior 5 > reference's 1 -> lowered to 1, the other coordinates kept; row 1: 0.5 < 4 -> unchanged
    assert torch.equal(capped, torch.tensor([[1.0, 1.0, -1.0], [0.5, 3.0, 2.0]]))
    # any direction: the capped prior is min(prior, reference prior) and the orthogonal part is untouched
    g = torch.Generator().manual_seed(0)
    mu, rows, reference = torch.randn(16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50, 16,
                                                                                                     generator=g)
    capped = cap_logit_prior(rows, reference, mu)
    assert torch.allclose(capped @ mu, torch.minimum(rows @ mu, reference @ mu), atol=1e-5)
    unit = mu / mu.norm()
    assert torch.allclose(capped - (capped @ unit)[:, None] * unit, rows - (rows @ unit)[:, None] * unit,
                          atol=1e-5)


def _ctx(options: dict, base_model_dir=None) -> InitContext:
    base, new, base_rows, donor = _pair()
    return InitContext(base_vocab=base, new_vocab=new, alignment=align(base, new), base_input=base_rows,
                       base_output=None, donor_input=donor, options={"numbers": False, **PLAIN, **options},
                       base_model_dir=base_model_dir)


def test_fvt_ls_gap_pursuit_names_fvt_ls_rows_as_the_references_of_the_switched_tokens():
    """" catalog" (id 5) switches to OMP's row; its reference is exactly its fvt-ls row; with the cap off
    the plan carries none."""
    gap = {"ridge": 1e6, "pursue_gap": 0.05, "pursue_k": 2}
    ctx = _ctx(gap)
    plan = get_initializer("fvt-ls")(ctx)
    plain = build_embedding(get_initializer("fvt-ls")(_ctx({"ridge": 1e6})), "input", ctx.base_input)
    assert plan.prior_cap.ids.tolist() == [5]
    reference = torch.sparse.mm(plan.prior_cap.input_weights, ctx.base_input)
    assert torch.allclose(reference[0], plain[5], atol=1e-6)
    assert get_initializer("fvt-ls")(_ctx({**gap, "pursue_prior_cap": False})).prior_cap is None


def test_without_a_base_model_the_rows_stay_as_built_and_the_notes_say_why():
    method = resolve_method("fvt-ls", {"ridge": 1e6, "pursue_gap": 0.05, "pursue_min_cosine": 0.0,
                                       "pursue_k": 2, "numbers": False})
    ctx = _ctx(dict(method.options))
    uncapped = build_embedding(method.plan(ctx), "input", ctx.base_input)
    new_input, _, plan = finish_embeddings(ctx, method.plan(ctx), method)
    assert plan.notes["prior_cap"] == "skipped: no base model dir"
    assert torch.allclose(new_input[5], uncapped[5])


def test_mean_final_hidden_samples_the_models_own_text_and_the_cap_runs_on_a_real_model(tiny_pair):
    """μ comes from the model's own samples (deterministic for a seed, the caller's RNG untouched); with the
    base model dir known, the pipeline caps the switched rows against it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair["base_tied"]).eval()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = mean_final_hidden(model, 0, sequences=2, tokens=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, mean_final_hidden(model, 0, sequences=2, tokens=8))
    assert first.shape == (model.config.hidden_size,) and torch.isfinite(first).all()
    mu, why = logit_prior_direction(tiny_pair["base_tied"], 0)
    assert mu is not None and why == ""
    assert logit_prior_direction(tiny_pair["base_tied"], None)[0] is None
    assert logit_prior_direction(tiny_pair["base_tok"], 0)[1].startswith("transformers cannot load")


def test_transplant_caps_the_switched_rows_at_fvt_ls_rows_prior(tiny_pair, tmp_path):
    """End to end on a tiny tied model: every row the gap rule switched has μ·row <= μ·(its fvt-ls row), and
    the report says how many were lowered."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from transplant.pipeline import transplant

    def rows(name: str, options: dict):
        result = transplant(tiny_pair["base_tied"], tiny_pair["donor_model"], method="fvt-ls",
                            output=tmp_path / name, options={"ridge": 1e6, **options})
        return load_file(tmp_path / name / "model.safetensors")["model.embed_tokens.weight"], result

    plain, plain_result = rows("plain", PLAIN)
    gap = {"pursue_gap": 0.01, "pursue_min_cosine": 0.0, "pursue_k": 2}
    uncapped, uncapped_result = rows("uncapped", {**gap, "pursue_prior_cap": False})
    capped, result = rows("capped", gap)
    notes = result.extra["notes"]
    # rows the near-duplicate repair rebuilt after the cap (in any of the three runs) are its business; a
    # pursued row equal to fvt-ls's moves by float rounding only
    repaired = {new_id for run in (plain_result, uncapped_result, result)
                for new_id, _, _ in run.extra["notes"]["repairs"].duplicates}
    keep = torch.ones(plain.shape[0], dtype=torch.bool)
    keep[sorted(repaired)] = False
    plain, uncapped, capped = plain[keep], uncapped[keep], capped[keep]
    switched = (uncapped != plain).any(1)
    # (a pursued token whose OMP row the pipeline's later steps rebuild anyway does not differ)
    assert notes["pursued"] >= int(switched.sum()) > 0 and notes["prior_cap"] == "fvt-ls"
    start = AutoTokenizer.from_pretrained(tiny_pair["base_tied"]).bos_token_id
    mu, _ = logit_prior_direction(tiny_pair["base_tied"], start)
    # the written rows are the capped ones (bf16/fp32 rounding aside), and only switched rows moved
    assert torch.allclose(capped[~switched], plain[~switched], atol=1e-6)
    assert ((capped[switched].float() @ mu) <= (plain[switched].float() @ mu) + 1e-3).all()
    lowered = ((uncapped[switched].float() @ mu) > (plain[switched].float() @ mu) + 1e-3).sum()
    assert notes["prior_capped"] >= int(lowered) > 0


def test_a_base_model_that_does_not_fit_in_memory_is_not_loaded(tiny_pair, monkeypatch):
    import transplant.io.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1000)
    mu, why = logit_prior_direction(tiny_pair["base_tied"], 0)
    assert mu is None and "GiB are free on cpu" in why and "pursue_prior_cap=false" in why


def test_the_benchs_prior_swap_sets_the_prior_and_keeps_the_rest(monkeypatch):
    """bench/bench_logit_prior.py's `set_prior`: μ·row becomes μ·reference (both ways), the part of the row
    orthogonal to μ is kept."""
    import importlib.util
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "path", list(sys.path))
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_logit_prior.py"
    spec = importlib.util.spec_from_file_location("bench_logit_prior", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    g = torch.Generator().manual_seed(1)
    mu, rows, reference = (torch.randn(16, generator=g), torch.randn(40, 16, generator=g),
                           torch.randn(40, 16, generator=g))
    swapped = module.set_prior(rows, reference, mu)
    assert torch.allclose(swapped @ mu, reference @ mu, atol=1e-5)
    unit = mu / mu.norm()
    assert torch.allclose(swapped - (swapped @ unit)[:, None] * unit, rows - (rows @ unit)[:, None] * unit,
                          atol=1e-5)


def test_a_model_that_cannot_sample_leaves_the_rows_uncapped(tiny_pair, monkeypatch):
    import transplant.init.logit_prior as logit_prior

    def broken(model, start_id, **_):
        raise RuntimeError("generate is not supported\nsecond line")

    monkeypatch.setattr(logit_prior, "mean_final_hidden", broken)
    mu, why = logit_prior_direction(tiny_pair["base_tied"], 0)
    assert mu is None and why.endswith("(generate is not supported)") and why.startswith("sampling from")
    monkeypatch.setattr(logit_prior, "mean_final_hidden", lambda model, start: torch.tensor([float("nan")]))
    assert "non-finite" in logit_prior_direction(tiny_pair["base_tied"], 0)[1]
