"""bench/bench_token_classes.py's pieces on hand-made tensors: donor-space reconstruction error from a plan's
weights, the row cache, and that a class swap changes only that class's rows."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch):
    """The script as a module (it puts bench/ on sys.path for bench_default; both are undone after)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("bench_token_classes",
                                                  ROOT / "bench" / "bench_token_classes.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_token_classes", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_donor_reconstruction(bench):
    # new vocab: ids 0, 1 shared (base ids 1, 0); new ids 2, 3, 4, 5; base id 2 has no donor row
    new_to_base = torch.tensor([1, 0, -1, -1, -1, -1])
    donor = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    triplets = [(2, 1, 1.0), (2, 0, 1.0),  # = donor[0] + donor[1]: exact
                (3, 1, 1.0),  # donor[0] for target (2, 0): error 1/2
                (4, 2, 1.0)]  # base id 2 is not shared: undefined
    rows, cols, vals = zip(*triplets)
    weights = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.tensor(vals), (6, 3),
                                      check_invariants=True)
    errors = bench.donor_reconstruction(weights, new_to_base, donor, torch.tensor([2, 3, 4, 5]), chunk=2)
    assert errors[0].item() == 0.0
    assert math.isclose(errors[1].item(), 0.5)
    assert errors[2].isnan() and errors[3].isnan()  # a piece without a donor row; no weights at all (dense)


def test_cache_round_trip_and_mix(bench, tmp_path):
    rows = bench.Rows(torch.randn(5, 3), None, torch.tensor([float("nan"), 0.1, 0.2, 0.3, 0.4]), 12.5)
    path = bench.cache_file(tmp_path, "a:b", "omp:k=8,prefilter=0")
    bench.save_cached(path, rows, "omp:k=8,prefilter=0")
    back = bench.load_cached(path, 5)
    assert back.cached and back.seconds == 12.5 and back.output is None
    assert torch.equal(back.input, rows.input)
    assert torch.equal(back.recon.nan_to_num(-1), rows.recon.nan_to_num(-1))
    assert bench.load_cached(path, 6) is None  # another vocabulary size: solved again
    other = torch.randn(5, 3)
    mask = torch.tensor([False, False, True, False, True])
    mix = bench.mixed(rows.input, other, mask)
    assert torch.equal(mix[mask], other[mask]) and torch.equal(mix[~mask], rows.input[~mask])
    assert bench.mixed(None, None, mask) is None
