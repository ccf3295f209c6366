"""Bench helpers the GPU checks and the OMP screening bench rest on: config overrides of the random-weight
models (the 1B Llama shape of issue 22 item 7 is SmolLM2's folder with wider settings) and the screened
pursuit of bench_omp_screen on hand-made dictionaries."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_random_model_overrides(tmp_path, monkeypatch):
    script = load_script("random_models", monkeypatch)
    assert script.parse_overrides(["hidden_size=32", "tie_word_embeddings=true", "hidden_act=silu"]) == {
        "hidden_size": 32, "tie_word_embeddings": True, "hidden_act": "silu"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        script.parse_overrides(["hidden_size"])
    shape = tmp_path / "shape"
    shape.mkdir()
    (shape / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 50,
        "tie_word_embeddings": True}))
    (shape / "tokenizer.json").write_text("{}")
    wide = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "head_dim": 8}
    count = script.random_model(shape, tmp_path / "out", torch.float32, wide)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {key: config[key] for key in wide} == wide
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    # embeddings 50 x 32 (tied) + 3 layers of q/o 32x32, k/v 32x8 (one kv head of 8), MLP 3 x 32x64, two
    # norms; the final norm
    assert count == 50 * 32 + 3 * (2 * 32 * 32 + 2 * 32 * 8 + 3 * 32 * 64 + 2 * 32) + 32


def test_screened_pursuit(monkeypatch):
    from transplant.solvers.omp import omp

    script = load_script("bench_omp_screen", monkeypatch)
    torch.manual_seed(0)
    atoms = torch.randn(300, 24) * (torch.rand(300, 1) + 0.5)  # rows of unequal norm: picks use unit atoms
    unit = atoms / atoms.norm(dim=1, keepdim=True)
    targets = torch.randn(40, 24)
    # every atom a candidate: the bench's plain pursuit is the solver's exact OMP (same atoms, same error)
    everything = torch.arange(300).expand(40, -1)
    chosen, coefs = script.omp_in_candidates(targets, atoms, unit, everything, 5)
    exact, exact_coefs = omp(targets, atoms, 5, prefilter=None, gram_dtype=None)
    assert script.support_share(chosen, exact) == pytest.approx(1.0)
    assert torch.allclose(script.relative_error(targets, atoms, chosen, coefs),
                          script.relative_error(targets, atoms, exact, exact_coefs), atol=1e-5)
    # candidates without each target's first exact pick: never chosen, and the greedy error is no lower on
    # average (greedy is not optimal per target, so only the mean is compared)
    narrowed = torch.stack([torch.tensor([i for i in range(300) if i != int(row[0])]) for row in exact])
    chosen, coefs = script.omp_in_candidates(targets, atoms, unit, narrowed, 5)
    assert not (chosen == exact[:, :1]).any()
    assert script.support_share(chosen, exact) < 1.0
    assert (script.relative_error(targets, atoms, chosen, coefs).mean()
            >= script.relative_error(targets, atoms, exact, exact_coefs).mean())
    # the pursuit in a projection that keeps every direction is exact OMP too; a rank-2 one is worse
    _, vectors = torch.linalg.eigh((unit.T @ unit).double())
    vectors = vectors.flip(1)
    full, full_coefs = script.projected_pursuit(targets, atoms, unit, vectors, 24, 300, 5)
    assert script.support_share(full, exact) == pytest.approx(1.0)
    thin, thin_coefs = script.projected_pursuit(targets, atoms, unit, vectors, 2, 300, 5)
    assert (script.relative_error(targets, atoms, thin, thin_coefs).mean()
            > script.relative_error(targets, atoms, full, full_coefs).mean())
