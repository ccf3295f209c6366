"""Healing scores: how much of the way back to the teacher a run went, counted so that corpus fitting earns
nothing.

A slice cut from a source the student trains on rewards fitting that source: plain CE can pass the teacher
there (domain learning), while a loss whose fixed point is the teacher cannot. So every score here
- caps credit at the teacher: `gap_closed_capped` counts the way from the start down to the teacher and
  stops there; what goes past it is `overshoot` (bits/byte), reported in its own column;
- groups slices into *in-domain* (the tail of a training source) and *untrained source* (never in the
  training mix), and conclusions are drawn from the untrained group;
- aggregates over seeds as mean and spread, and calls two arms a tie when their spreads overlap.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence


def gap_closed_capped(start: float, end: float, teacher: float) -> float:
    """Share of the start-to-teacher bits/byte gap closed, credit stopping at the teacher: 1.0 = reached it
    (or passed it), 0 = no change, negative = worse than the start. NaN when the teacher is not better than
    the start (nothing to heal towards on that slice)."""
    if not start > teacher:
        return math.nan
    return (start - max(end, teacher)) / (start - teacher)


def pooled_gap_closed(rows: Sequence[tuple[float, float, float]]) -> float:
    """(start, end, teacher) per slice -> bits closed (capped at the teacher) over bits of gap, summed over
    the slices whose teacher is better: a group score that slices with a tiny gap cannot swing (a per-slice
    percentage over a 0.03 bits/byte gap moves 50 points with the data order)."""
    kept = [(start, end, teacher) for start, end, teacher in rows if start > teacher]
    gap = sum(start - teacher for start, _, teacher in kept)
    return sum(start - max(end, teacher) for start, end, teacher in kept) / gap if gap > 0 else math.nan


def overshoot(end: float, teacher: float) -> float:
    """Bits/byte past the teacher (0 when not past it): domain learning, not healing."""
    return max(teacher - end, 0.0)


def slice_groups(slices: Iterable[str], trained_on: Iterable[str]) -> dict[str, list[str]]:
    """{"in-domain": [...], "untrained": [...]}: a slice is in-domain when its name is a training source
    (`texts:NAME` in `data.train`, given here as NAME)."""
    trained = set(trained_on)
    names = list(slices)
    return {"in-domain": [s for s in names if s in trained],
            "untrained": [s for s in names if s not in trained]}


def group_mean(values: Mapping[str, float], members: Sequence[str]) -> float:
    """Mean over the group's slices that have a value (NaN slices, where the teacher is not better,
    skipped)."""
    kept = [values[m] for m in members if m in values and not math.isnan(values[m])]
    return statistics.fmean(kept) if kept else math.nan


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, spread) over seeds; spread = sample standard deviation (0 for one seed)."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def is_tie(a: Sequence[float], b: Sequence[float]) -> bool:
    """Two arms' seed values tie when mean ± spread intervals overlap (one seed each: never a tie, but such a
    comparison should not be reported as a ranking either)."""
    (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
    return abs(ma - mb) <= sa + sb


def format_mean_spread(values: Sequence[float], percent: bool = False, digits: int = 4) -> str:
    mean, spread = mean_spread(values)
    if math.isnan(mean):
        return "n/a"
    if percent:
        return f"{100 * mean:.1f}% ± {100 * spread:.1f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _measured_slices(history: Sequence[Mapping[str, float]]) -> tuple[Mapping, Mapping, list[str]] | None:
    """(step-0 eval record, last eval record, slices both score and the teacher has), or None when the run
    has no second eval or no teacher BPB to measure against."""
    evals = [r for r in history if any(k.startswith("eval_bpb_") for k in r)]
    if len(evals) < 2 or not any(k.startswith("teacher_bpb_") for k in evals[0]):
        return None
    first, last = evals[0], evals[-1]
    names = [k.removeprefix("eval_bpb_") for k in last if k.startswith("eval_bpb_") and k != "eval_bpb_all"]
    return first, last, [n for n in names if f"eval_bpb_{n}" in first and f"teacher_bpb_{n}" in first]


def run_healing(history: Sequence[Mapping[str, float]], trained_on: Iterable[str]) -> dict[str, float]:
    """One run's healing from its metrics records (the step-0 eval with the teacher's BPB, the last eval):
    pooled capped gap closed per group, overshoot summed over the in-domain slices, and the mean
    disagreement with the teacher on the untrained slices. Empty when the run has no step-0 or teacher
    eval (nothing to measure against)."""
    measured = _measured_slices(history)
    if measured is None:
        return {}
    first, last, names = measured
    groups = slice_groups(names, trained_on)
    rows = {n: (first[f"eval_bpb_{n}"], last[f"eval_bpb_{n}"], first[f"teacher_bpb_{n}"]) for n in names}
    summary = {"step": float(last.get("step", math.nan))}
    for group, key in (("untrained", "untrained"), ("in-domain", "in_domain")):
        if groups[group]:
            summary[f"gap_closed_{key}"] = pooled_gap_closed([rows[n] for n in groups[group]])
    summary["overshoot_in_domain"] = sum(overshoot(rows[n][1], rows[n][2]) for n in groups["in-domain"])
    disagree = {n: last[f"eval_disagree_{n}"] for n in groups["untrained"] if f"eval_disagree_{n}" in last}
    if disagree:
        summary["disagree_untrained"] = statistics.fmean(disagree.values())
    return summary


def format_run_healing(history: Sequence[Mapping[str, float]], trained_on: Iterable[str]) -> str:
    """One line for the CLI (`run_healing`), the untrained-source group first: conclusions come from it."""
    summary = run_healing(history, trained_on)
    if not summary:
        return ""
    groups = slice_groups(_measured_slices(history)[2], trained_on)
    parts = []
    if "gap_closed_untrained" in summary:
        untrained = ", ".join(groups["untrained"])
        parts.append(f"gap closed, capped at the teacher: untrained sources ({untrained}) "
                     f"{100 * summary['gap_closed_untrained']:.1f}%")
    if "gap_closed_in_domain" in summary:
        in_domain = ", ".join(groups["in-domain"])
        parts.append(f"in-domain ({in_domain}) {100 * summary['gap_closed_in_domain']:.1f}%"
                     f" (+{summary['overshoot_in_domain']:.3f} bits/byte past the teacher)")
    if "disagree_untrained" in summary:
        parts.append("disagreement with the teacher on untrained sources "
                     f"{summary['disagree_untrained']:.4f} bits/byte")
    return "; ".join(parts)


__all__ = ["format_mean_spread", "format_run_healing", "gap_closed_capped", "group_mean", "is_tie",
           "mean_spread", "overshoot", "pooled_gap_closed", "run_healing", "slice_groups"]
