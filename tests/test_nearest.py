"""Best |cosine| of each target with any atom: exact, and the inverted-file estimate."""

from __future__ import annotations

import torch

from transplant.solvers import nearest
from transplant.solvers.nearest import (
    estimated_max_abs_cosine,
    exact_max_abs_cosine,
    max_abs_cosine,
    spherical_kmeans,
    unit_rows,
)


def _problem(n_atoms: int = 2000, dim: int = 24, n_targets: int = 300):
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(n_atoms, dim, generator=g) * torch.rand(n_atoms, 1, generator=g).add(0.5)
    targets = torch.randn(n_targets, dim, generator=g)
    return targets, atoms


def test_kmeans_groups_an_atom_with_its_negation_and_is_reproducible():
    _, atoms = _problem()
    unit = unit_rows(torch.cat([atoms, -atoms]))
    centroids, assignment = spherical_kmeans(unit, 40)
    assert torch.equal(assignment[:2000], assignment[2000:])
    assert torch.allclose(centroids.norm(dim=1), torch.ones(40), atol=1e-5)
    again, _ = spherical_kmeans(unit, 40)
    assert torch.equal(centroids, again)


def test_the_estimate_is_a_lower_bound_and_exact_when_every_group_is_probed():
    targets, atoms = _problem()
    unit_t, unit_a = unit_rows(targets), unit_rows(atoms)
    exact = exact_max_abs_cosine(unit_t, unit_a, batch=64)
    assert torch.allclose(exact, (unit_t @ unit_a.T).abs().amax(1))
    some = estimated_max_abs_cosine(unit_t, unit_a, clusters=50, probes=5)
    assert bool((some <= exact + 1e-6).all())
    assert bool((some < exact - 1e-6).any())  # five of fifty groups do miss some nearest atoms on noise
    every = estimated_max_abs_cosine(unit_t, unit_a, clusters=50, probes=50)
    assert torch.allclose(every, exact, atol=1e-6)


def test_a_target_near_an_atom_finds_it_through_a_few_groups():
    """What the estimate is for: a donor row that some anchor points to (here a noisy, rescaled, sign-flipped
    copy of an atom) is found with five of fifty groups probed."""
    _, atoms = _problem()
    g = torch.Generator().manual_seed(1)
    picked = torch.randperm(2000, generator=g)[:200]
    noise = torch.randn(200, 24, generator=g) / 24**0.5
    near = -3.0 * atoms[picked] + 0.2 * atoms[picked].norm(dim=1, keepdim=True) * noise
    estimate = estimated_max_abs_cosine(unit_rows(near), unit_rows(atoms), clusters=50, probes=5)
    exact = exact_max_abs_cosine(unit_rows(near), unit_rows(atoms))
    assert bool((exact > 0.9).all())
    assert torch.allclose(estimate, exact, atol=1e-6)


def test_max_abs_cosine_is_exact_for_a_small_problem_and_estimates_a_large_one(monkeypatch):
    targets, atoms = _problem()
    exact = exact_max_abs_cosine(unit_rows(targets), unit_rows(atoms))
    assert torch.equal(max_abs_cosine(targets, atoms), exact)
    monkeypatch.setattr(nearest, "EXACT_FLOPS", 0)
    estimate = max_abs_cosine(targets, atoms, probes=3)
    assert bool((estimate <= exact + 1e-6).all()) and not torch.equal(estimate, exact)
    assert max_abs_cosine(targets[:0], atoms).shape == (0,)
