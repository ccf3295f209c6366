"""How close is each target to its nearest atom? The best |cosine|, exact or estimated by an inverted file.

`fvt-ls --set pursue_gap=…` gains only on tokens whose donor row OMP rebuilds well, and OMP rebuilds a row
well almost only when some anchor already points its way: on SmolLM2 ← Gemma-3 the best |cosine| of a token's
donor row with any anchor separates the tokens the gap rule takes (bench/RESULTS.md, "Within three minutes,
end to end"). The exact best cosine is the first GEMM of OMP itself (every target against every
anchor: 162 s of its 452 s there), so for many targets it is estimated: the unit atoms are grouped by a
sign-blind spherical k-means, and each target is compared exactly with the atoms of its `probes` nearest
groups only (~`probes`/`clusters` of the GEMM). The estimate is a lower bound of the exact value (a maximum
over a subset of the atoms); it misses where the nearest atom sits in a group the target's centroid scores
did not reach.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EXACT_FLOPS = 2e11  # below this many multiply-adds the exact GEMM is cheaper than building the groups


def unit_rows(matrix: Tensor) -> Tensor:
    """Rows scaled to norm 1 in float32; zero rows stay zero."""
    matrix = matrix.float()
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)


def spherical_kmeans(unit_atoms: Tensor, clusters: int, iterations: int = 6,
                     seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sign-blind spherical k-means: (centroids [C, D] unit, assignment [N] int64 of each atom).

    An atom joins the centroid of largest |cosine| and enters its mean with that cosine's sign, so an atom
    and its negation share a group (OMP scores atoms by |correlation|). Each iteration is one [N, D]·[D, C]
    product; `seed` fixes the initial centroids (distinct atoms drawn at random) so the result is
    reproducible."""
    generator = torch.Generator().manual_seed(seed)
    n_atoms = unit_atoms.shape[0]
    clusters = max(1, min(clusters, n_atoms))
    start = torch.randperm(n_atoms, generator=generator)[:clusters].to(unit_atoms.device)
    centroids = unit_atoms[start].clone()
    assignment = torch.zeros(n_atoms, dtype=torch.long, device=unit_atoms.device)
    for _ in range(iterations):
        similarity = unit_atoms @ centroids.T
        assignment = similarity.abs().argmax(dim=1)
        sign = similarity.gather(1, assignment[:, None]).sign()
        sums = torch.zeros_like(centroids).index_add_(0, assignment, unit_atoms * sign)
        norms = sums.norm(dim=1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centroids)  # empty group: keep it
    return centroids, assignment


def exact_max_abs_cosine(unit_targets: Tensor, unit_atoms: Tensor, batch: int = 4096) -> Tensor:
    """max over atoms of |cos(target, atom)| per target [B]: the GEMM unit_targets·unit_atomsᵀ, in batches."""
    best = torch.empty(unit_targets.shape[0], dtype=torch.float32, device=unit_targets.device)
    for start in range(0, unit_targets.shape[0], batch):
        part = unit_targets[start : start + batch]
        best[start : start + batch] = (part @ unit_atoms.T).abs_().amax(dim=1)
    return best


def estimated_max_abs_cosine(unit_targets: Tensor, unit_atoms: Tensor, clusters: int, probes: int,
                             seed: int = 0) -> Tensor:
    """Lower bound of the best |cosine| per target [B]: exact over the atoms of the target's `probes` groups
    of largest |cosine| with their centroid. Costs ≈ probes/clusters of the exact GEMM plus [B, C]
    centroid scores; one small GEMM per group over the targets that probe it."""
    centroids, assignment = spherical_kmeans(unit_atoms, clusters, seed=seed)
    probes = min(probes, centroids.shape[0])
    probed = (unit_targets @ centroids.T).abs_().topk(probes, dim=1).indices  # [B, p]
    target_of = torch.arange(unit_targets.shape[0], device=unit_targets.device).repeat_interleave(probes)
    group_of = probed.flatten()
    order = torch.argsort(group_of, stable=True)
    target_of, group_of = target_of[order], group_of[order]
    pair_counts = torch.bincount(group_of, minlength=centroids.shape[0]).tolist()
    atom_order = torch.argsort(assignment, stable=True)
    atom_counts = torch.bincount(assignment, minlength=centroids.shape[0]).tolist()
    best = torch.zeros(unit_targets.shape[0], dtype=torch.float32, device=unit_targets.device)
    pair_start = atom_start = 0
    for pairs, atoms in zip(pair_counts, atom_counts):
        if pairs and atoms:
            who = target_of[pair_start : pair_start + pairs]
            members = unit_atoms[atom_order[atom_start : atom_start + atoms]]
            scores = (unit_targets[who] @ members.T).abs_().amax(dim=1)
            best.scatter_reduce_(0, who, scores, reduce="amax")
        pair_start += pairs
        atom_start += atoms
    return best


def max_abs_cosine(targets: Tensor, atoms: Tensor, probes: int = 32, clusters: int | None = None) -> Tensor:
    """Best |cosine| of each target [B, D] with any atom [N, D], as float32 [B]: exact when the GEMM is
    small (B·N·D ≤ EXACT_FLOPS), else the inverted-file estimate with `clusters` groups (None: ~4.8·√N,
    1,024 for 46k anchors) probed `probes` at a time."""
    unit_targets, unit_atoms = unit_rows(targets), unit_rows(atoms)
    n_targets, n_atoms = unit_targets.shape[0], unit_atoms.shape[0]
    if n_targets == 0 or n_atoms == 0:
        return torch.zeros(n_targets, dtype=torch.float32, device=targets.device)
    if n_targets * n_atoms * unit_atoms.shape[1] <= EXACT_FLOPS:
        return exact_max_abs_cosine(unit_targets, unit_atoms)
    clusters = clusters or max(1, round(4.8 * math.sqrt(n_atoms)))
    return estimated_max_abs_cosine(unit_targets, unit_atoms, clusters, probes)
