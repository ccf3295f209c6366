"""The transplant report: what matched, how well new tokens were reconstructed, how numbers were handled, BPB.

Written as report.json (machine-readable), report.md (for people) and report.png (reconstruction-error
histogram) into the output model dir, so a transplanted model always carries how it was made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from transplant.init.base import InitPlan
from transplant.init.repair import RepairSummary
from transplant.tokenizers.vocab import TokenKind, Vocab


def show_token(piece: bytes) -> str:
    """Readable token text: spaces as ␣, newlines escaped, invalid UTF-8 as \\xNN."""
    text = piece.decode("utf-8", errors="backslashreplace")
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")


def decompositions(plan: InitPlan, new_vocab: Vocab, base_vocab: Vocab, ids: list[int],
                   top: int = 4) -> list[str]:
    """Lines such as `␣catalog = 0.61·␣cat + 0.33·alog` for the given new ids (input-embedding plan)."""
    weights = plan.input_weights.coalesce()
    rows, cols = weights.indices()
    values = weights.values()
    lines = []
    for new_id in ids:
        mask = rows == new_id
        if not bool(mask.any()):
            continue
        order = values[mask].abs().argsort(descending=True)[:top]
        terms = [f"{float(values[mask][j]):.2f}·{show_token(base_vocab.token_bytes[int(cols[mask][j])])}"
                 for j in order]
        more = " + …" if int(mask.sum()) > top else ""
        lines.append(f"{show_token(new_vocab.token_bytes[new_id])} = "
                     + " + ".join(terms).replace("+ -", "− ") + more)
    return lines


def example_ids(new_ids: list[int], new_vocab: Vocab, n: int = 12) -> list[int]:
    """A fixed, readable sample of new tokens: word-like ones first, spread across the id range."""
    wordlike = [i for i in new_ids if new_vocab.kinds[i] is TokenKind.NORMAL
                and len(new_vocab.token_bytes[i]) >= 4
                and new_vocab.token_bytes[i].strip().isalpha()]
    pool = wordlike or new_ids
    step = max(len(pool) // n, 1)
    return pool[::step][:n]


def build_report(*, base: str, donor: str, method: str, stats: dict[str, Any], plan: InitPlan,
                 base_vocab: Vocab, new_vocab: Vocab, new_ids: list[int], seconds: float,
                 bpb: dict[str, dict[str, float]] | None, options: dict[str, Any]) -> dict[str, Any]:
    from transplant.version import __version__

    notes = {k: v for k, v in plan.notes.items() if not isinstance(v, torch.Tensor) and k != "repairs"}
    report: dict[str, Any] = {
        "tokentransplant_version": __version__, "base": base, "donor": donor, "method": method,
        "options": options, "seconds": round(seconds, 2), "statistics": stats, "method_notes": notes,
        "examples": decompositions(plan, new_vocab, base_vocab, example_ids(new_ids, new_vocab)),
        "bits_per_byte": bpb or {},
    }
    repairs = plan.notes.get("repairs")
    if repairs is not None:
        report.update(repair_section(repairs, new_vocab, options))
    errors = plan.notes.get("reconstruction_error")
    if isinstance(errors, torch.Tensor) and errors.numel():
        q = torch.quantile(errors.float(), torch.tensor([0.1, 0.5, 0.9, 0.99]))
        report["reconstruction_error"] = {"mean": float(errors.mean()), "p10": float(q[0]),
                                          "median": float(q[1]), "p90": float(q[2]), "p99": float(q[3]),
                                          "n": int(errors.numel())}
    return report


def _spelled(vocab: Vocab, idx: int) -> str:
    """A token as its tokenizer spells it where bytes are ambiguous: byte-fallback tokens as `<0xNN>`."""
    piece = vocab.token_bytes[idx]
    return f"<0x{piece[0]:02X}>" if vocab.kinds[idx] is TokenKind.BYTE else show_token(piece)


def repair_section(repairs: RepairSummary, new_vocab: Vocab, options: dict[str, Any],
                   n: int = 8) -> dict[str, Any]:
    """`unreachable_rows` and `near_duplicates_repaired` for report.json: counts, policy and a few
    examples."""
    unreachable = repairs.unreachable
    step = max(len(unreachable) // n, 1)
    return {
        "unreachable_rows": {"count": len(unreachable), "policy": options["unreachable"],
                             "examples": [_spelled(new_vocab, i) + f" (id {i})"
                                          for i in unreachable[::step][:n]]},
        "near_duplicates_repaired": {
            "count": len(repairs.duplicates), "fell_back_to_midpoint_with_mean": repairs.duplicates_shrunk,
            "threshold": options["dedup_cosine"],
            "examples": [f"{_spelled(new_vocab, d)} ≈ {_spelled(new_vocab, m)} (cosine {c:.4f})"
                         for d, m, c in repairs.duplicates[:n]]},
        "rows_rescaled": repairs.rescaled,
    }


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Transplant report: {report['base']} ← {report['donor']} ({report['method']})", "",
             f"tokentransplant {report['tokentransplant_version']}, {report['seconds']} s, options "
             f"`{json.dumps(report['options'], default=str)}`", "", "## Match statistics", "",
             "| statistic | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["statistics"].items()]
    if "reconstruction_error" in report:
        r = report["reconstruction_error"]
        lines += ["", "## Reconstruction error in the donor space (relative L2)", "",
                  f"mean {r['mean']:.3f}, p10 {r['p10']:.3f}, median {r['median']:.3f}, p90 {r['p90']:.3f}, "
                  f"p99 {r['p99']:.3f} over {r['n']} new tokens (see report.png)"]
    for key in ("unreachable_rows", "near_duplicates_repaired"):
        if key in report:
            entry = report[key]
            lines += ["", f"## {key.replace('_', ' ').capitalize()}: {entry['count']}", ""]
            lines += [f"- `{example}`" for example in entry["examples"]]
    lines += ["", "## Example decompositions", "", "```"] + report["examples"] + ["```"]
    if report["bits_per_byte"]:
        lines += ["", "## Bits per byte on held-out text (lower is better)", "", "| slice | before | after |",
                  "|---|---|---|"]
        lines += [f"| {name} | {v['before']:.4f} | {v['after']:.4f} |"
                  for name, v in report["bits_per_byte"].items()]
    lines += ["", "## Method notes", "", "```",
              json.dumps(report["method_notes"], indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def write_report(directory: Path, report: dict[str, Any], plot: bytes | None) -> None:
    """Write report.json / report.md / report.png, each via a temp file renamed into place."""
    files: dict[str, bytes] = {"report.json": json.dumps(report, indent=2, default=str).encode(),
                               "report.md": render_markdown(report).encode()}
    if plot:
        files["report.png"] = plot
    for name, data in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)
