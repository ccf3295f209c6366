"""Healing benchmark: SmolLM2-135M given the Mistral v3 tokenizer (training-free fvt init), then the same
budget of steps with each distillation objective; held-out bits/byte versus steps, and step time.

Each objective runs as its own `distill` process (same recipe, only `loss.name` differs), so timings and peak
memory are per run. The teacher is the original SmolLM2-135M (self-distillation); plain CE needs no teacher
and skips its forward, so "ALM / CE step time" is the whole price of distillation (teacher forward, alignment
in the data loader, chunk loss).

    python bench/bench_healing.py --steps 60 --seq 256 --batch 4      # ~ (3 x steps x step time) on 2 cores

Scores (`distill.scores`): per slice the gap to the teacher closed *capped at the teacher* and the overshoot
past it (domain learning) in its own column, the disagreement with the teacher (`distill.agreement`,
bits/byte), slices grouped as in-domain (a `data.train` source) and untrained source; every arm runs `--seeds`
and prints mean ± spread; arms whose spreads overlap are a tie. `--recipe` picks the job, e.g. the
cross-tokenizer one:

    python bench/bench_healing.py --recipe recipes/cpu_gemma3_to_smollm2.yaml --student smollm2-135m ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_smoke_smollm2_mistral.yaml"


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RUNNER = ("import sys; from distill.config import load_recipe; from distill.trainer import run; "
          "run(load_recipe(sys.argv[1], sys.argv[2:]))")


def run_one(variant: str, args: argparse.Namespace, work: Path, seed: int = 0) -> list[dict]:
    """`variant` is a loss name, optionally with recipe overrides: `alm/loss.ce_weight=1/train.steps=60`.
    Each run is its own process (timings and peak memory per run); `--reuse` keeps finished runs."""
    loss, *overrides = variant.split("/")
    out = work / (variant.replace("/", "__").replace("=", "-") + f"__seed{seed}")
    metrics = out / "metrics.jsonl"
    steps = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.steps=")), args.steps)
    if args.reuse and metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        if any(r.get("step") == steps and "loss" in r for r in records):
            return records
    sets = {
        "output_dir": str(out), "student.path": args.student, "loss.name": loss, "train.steps": args.steps,
        "train.micro_batch_size": args.batch, "train.grad_accum": 1, "data.max_length": args.seq,
        "data.train_bytes": args.train_bytes, "eval.every": args.eval_every, "eval.n_bytes": args.eval_bytes,
        "train.embeddings_only_steps": args.embedding_steps, "checkpoint.every": 0,
        "export.enabled": args.export, "train.log_every": 10, "optim.lr": args.lr,
        "optim.embedding_lr": args.embedding_lr, "train.seed": seed,
    }
    sets.update(override.split("=", 1) for override in overrides)
    if args.eval_texts:
        sets["eval.texts"] = "[" + ",".join(args.eval_texts) + "]"
    command = [sys.executable, "-c", RUNNER, str(args.recipe), *(f"{k}={v}" for k, v in sets.items())]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    # a world of its own: the interleaved timing's process group (same process) left RANK/MASTER_PORT set
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    print(f"{variant} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def finished(variant: str, args: argparse.Namespace, work: Path, seed: int) -> bool:
    """Whether `run_one` would reuse this run (for `--report-only` on a sweep still running)."""
    steps = next((int(o.split("=", 1)[1]) for o in variant.split("/")[1:] if o.startswith("train.steps=")),
                 args.steps)
    metrics = work / (variant.replace("/", "__").replace("=", "-") + f"__seed{seed}") / "metrics.jsonl"
    return metrics.exists() and any(json.loads(line).get("step") == steps and "loss" in json.loads(line)
                                    for line in metrics.read_text().splitlines())


def summarise(loss: str, records: list[dict]) -> dict:
    """Per-run summary; `bpb` is the first eval text (english) per step, `per_text` every text per step."""
    steps = [r for r in records if "step_time" in r]
    per_text: dict[str, dict[int, float]] = {}
    disagree: dict[str, dict[int, float]] = {}
    teacher: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("eval_bpb_") and key != "eval_bpb_all":
                per_text.setdefault(key.removeprefix("eval_bpb_"), {})[record["step"]] = value
            elif key.startswith("eval_disagree_"):
                disagree.setdefault(key.removeprefix("eval_disagree_"), {})[record["step"]] = value
            elif key.startswith("teacher_bpb_") and key != "teacher_bpb_all":
                teacher[key.removeprefix("teacher_bpb_")] = value
    first = next(iter(per_text), None)
    times = [r["step_time"] for r in steps[2:]] or [r["step_time"] for r in steps]
    return {"loss": loss, "steps": len(steps), "median_step_s": statistics.median(times),
            "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in steps),
            "bpb": per_text.get(first, {}), "per_text": per_text, "teacher": teacher, "disagree": disagree,
            "wall_step_s": sum(r["step_time"] for r in steps),
            "teacher_bpb": teacher.get(first),
            "first_loss": steps[0]["loss"], "last_loss": statistics.mean(r["loss"] for r in steps[-5:])}


def gap_closed(start: float, end: float, teacher: float) -> float:
    """Share of the start-to-teacher BPB gap a run closed (negative: it got worse)."""
    return (start - end) / (start - teacher) if start != teacher else 0.0


def interleaved_timing(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Median step time per loss, the losses taking turns step by step on ONE trainer, so that every loss sees
    the same machine load (on a shared machine a run-by-run comparison mostly measures the neighbours)."""
    from distill.config import load_recipe
    from distill.trainer import Trainer

    out = work / "timing"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    import torch

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, [f"output_dir={out}", f"student.path={args.student}", "eval.texts=[]",
                                  f"train.micro_batch_size={args.batch}", "train.grad_accum=1",
                                  f"data.max_length={args.seq}", f"data.train_bytes={args.train_bytes}",
                                  "train.embeddings_only_steps=0", f"train.steps={10**6}"])
    trainer = Trainer(recipe).setup()
    trainer._start()
    losses = list(dict.fromkeys(arm.split("/")[0] for arm in args.losses))  # loss names; overrides ignored
    times: dict[str, list[float]] = {loss: [] for loss in losses}
    for round_ in range(args.ab_steps + 1):
        for loss in losses:
            trainer.use_loss(loss)
            record = trainer.train_step()
            if round_:  # the first round warms up allocators and caches
                times[loss].append(record["step_time"])
    return {loss: statistics.median(values) for loss, values in times.items()}


def table(rows: list[dict]) -> str:
    eval_steps = sorted({s for row in rows for s in row["bpb"]})
    head = ["method", "median step (s)", "vs ce", "peak RSS (MB)"] + [f"BPB @{s}" for s in eval_steps]
    ce = next((r["median_step_s"] for r in rows if r["loss"] == "ce"), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ratio = f"{row['median_step_s'] / ce:.2f}x" if ce else "-"
        cells = [row["loss"], f"{row['median_step_s']:.2f}", ratio, f"{row['peak_rss_mb']:.0f}"]
        cells += [f"{row['bpb'][s]:.4f}" if s in row["bpb"] else "" for s in eval_steps]
        lines.append("| " + " | ".join(cells) + " |")
    teacher = next((r["teacher_bpb"] for r in rows if r["teacher_bpb"] is not None), None)
    if teacher is not None:
        lines.append(f"\nteacher (original SmolLM2-135M, own tokenizer): {teacher:.4f} bits/byte")
    texts = sorted({t for row in rows for t in row["per_text"]})
    if texts:
        lines += ["", "| method | " + " | ".join(f"{t}: start -> end (gap closed)" for t in texts) + " |",
                  "|" + "---|" * (len(texts) + 1)]
        for row in rows:
            cells = []
            for text in texts:
                curve = row["per_text"].get(text, {})
                if not curve:
                    cells.append("")
                    continue
                start, end = curve[min(curve)], curve[max(curve)]
                closed = (gap_closed(start, end, row["teacher"][text]) if text in row["teacher"]
                          else float("nan"))
                cells.append(f"{start:.4f} -> {end:.4f} ({closed:+.0%})")
            lines.append(f"| {row['loss']} | " + " | ".join(cells) + " |")
        lines.append("teacher: "
                     + ", ".join(f"{t} {rows[0]['teacher'].get(t, float('nan')):.4f}" for t in texts))
    return "\n".join(lines)


def run_scores(row: dict) -> dict[str, dict[str, float]]:
    """Per slice of one run: start/end BPB, capped gap closed, overshoot, disagreement start/end."""
    from distill.scores import gap_closed_capped, overshoot

    scores = {}
    for name, curve in row["per_text"].items():
        start, end, teacher = curve[min(curve)], curve[max(curve)], row["teacher"].get(name, math.nan)
        agree = row["disagree"].get(name, {})
        scores[name] = {"start": start, "end": end, "teacher": teacher,
                        "closed": gap_closed_capped(start, end, teacher),
                        "overshoot": overshoot(end, teacher),
                        "disagree_start": agree[min(agree)] if agree else math.nan,
                        "disagree": agree[max(agree)] if agree else math.nan}
    return scores


def _versus(mine: list[float], theirs: list[float], sign: int) -> str:
    """'tie' when the seed spreads overlap, else better/worse (sign +1: higher is better; -1: lower)."""
    from distill.scores import is_tie

    if is_tie(mine, theirs):
        return "tie"
    delta = statistics.fmean(mine) - statistics.fmean(theirs)
    return "better" if delta * sign > 0 else "worse"


def seed_report(arms: dict[str, list[dict]], trained_on: list[str],
                timing: dict[str, float] | None = None) -> str:
    """Markdown tables over seeds: per slice (capped gap closed, overshoot, disagreement) and per group
    (untrained source / in-domain), mean ± spread, each arm against the first one (tie = spreads overlap)."""
    from distill.scores import format_mean_spread, group_mean, pooled_gap_closed, slice_groups

    per_arm = {arm: [run_scores(row) for row in rows] for arm, rows in arms.items()}
    first = next(iter(per_arm.values()))[0]
    slices = list(first)
    groups = slice_groups(slices, trained_on)
    lines = ["start (step 0) and teacher BPB: " + ", ".join(
        f"{s} {first[s]['start']:.4f} / {first[s]['teacher']:.4f}" for s in slices),
        f"groups: untrained = {', '.join(groups['untrained'])}; in-domain = "
             f"{', '.join(groups['in-domain'])}", "",
        "| arm (seeds) | "
             + " | ".join(f"{s}: end BPB / gap closed (capped) / overshoot / disagree" for s in slices)
        + " |", "|" + "---|" * (len(slices) + 1)]
    for arm, runs in per_arm.items():
        cells = [f"{format_mean_spread([r[s]['end'] for r in runs])} / "
                 f"{format_mean_spread([r[s]['closed'] for r in runs], percent=True)} / "
                 f"{format_mean_spread([r[s]['overshoot'] for r in runs], digits=3)} / "
                 f"{format_mean_spread([r[s]['disagree'] for r in runs])}" for s in slices]
        lines.append(f"| {arm} ({len(runs)}) | " + " | ".join(cells) + " |")
    head = ["arm (seeds)", "untrained: pooled gap closed (capped)", "mean of slices",
            "untrained: disagreement", "in-domain: pooled", "in-domain: overshoot (sum)",
            "vs first arm: pooled / disagreement", "median step s", "interleaved vs ce"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = None
    for arm, runs in per_arm.items():
        closed, inside = ([pooled_gap_closed([(r[s]["start"], r[s]["end"], r[s]["teacher"])
                                              for s in groups[g]])
                           for r in runs] for g in ("untrained", "in-domain"))
        per_slice = [group_mean({s: r[s]["closed"] for s in slices}, groups["untrained"]) for r in runs]
        disagree = [group_mean({s: r[s]["disagree"] for s in slices}, groups["untrained"]) for r in runs]
        over = [sum(r[s]["overshoot"] for s in groups["in-domain"]) for r in runs]
        if base is None:
            base, versus = (closed, disagree), "-"
        else:
            versus = " / ".join(_versus(mine, theirs, sign) for mine, theirs, sign
                                in ((closed, base[0], 1), (disagree, base[1], -1)))
        loss = arm.split("/")[0]
        ratio = f"{timing[loss] / timing['ce']:.2f}x" if timing and loss in timing and "ce" in timing else "-"
        step = statistics.median(row["median_step_s"] for row in arms[arm])
        lines.append(f"| {arm} ({len(runs)}) | {format_mean_spread(closed, percent=True)} | "
                     f"{format_mean_spread(per_slice, percent=True)} | {format_mean_spread(disagree)} | "
                     f"{format_mean_spread(inside, percent=True)} | {format_mean_spread(over, digits=3)} | "
                     f"{versus} | {step:.2f} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = list(rows[0].get("per_text") or {"english": rows[0]["bpb"]})
    fig, axes = plt.subplots(1, len(slices), figsize=(4.2 * len(slices), 3.8), squeeze=False)
    for ax, name in zip(axes[0], slices):
        for row in rows:
            curve = (row.get("per_text") or {}).get(name, row["bpb"])
            steps = sorted(curve, key=int)
            ax.plot([int(s) for s in steps], [curve[s] for s in steps], marker="o", label=row["loss"])
        teacher = next((r["teacher"].get(name) for r in rows if r.get("teacher")), None)
        if teacher is not None:
            ax.axhline(teacher, color="gray", linestyle="--", label="teacher (original tokenizer)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out bits/byte")
        ax.set_title(name)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M -> Mistral v3 tokenizer (fvt), healing at equal steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _followed_by(alignment, teacher):  # -> torch.Tensor
    """Bool [B, C]: the teacher token after the chunk's last one starts with space/tab/newline or is
    special."""
    import torch

    from distill.chunks import boundary_mask

    mask = boundary_mask(teacher)
    ids = alignment.teacher_input_ids
    nxt = (alignment.teacher_chunk_last + 1).clamp(max=ids.shape[1] - 1)
    inside = (alignment.teacher_chunk_last + 1) < alignment.teacher_attention_mask.sum(1, keepdim=True)
    return mask[ids.gather(1, nxt)] & inside & torch.ones_like(alignment.chunk_mask)


def debias_share(args: argparse.Namespace) -> list[dict]:
    """How much of each held-out slice ALM compares raw (biased) under the old `whitespace` debias, and what
    the reference's merging (`debias: merge`) makes of it, on SmolLM2 (teacher tokenizer and model) vs Mistral
    v3.

    Tokenizers only: the share of valid chunks not followed by whitespace (what `whitespace` leaves raw) and
    not followed by a unit boundary byte. With the teacher's forward (SmolLM2-135M, CPU, seconds): units per
    chunk after merging at P(boundary) > threshold, and the share of units closed without the teacher
    expecting a boundary there (only a gap or the end of a window closes them); every unit gets log
    P(boundary) appended, so no unit is compared raw."""
    import torch

    from distill.chunks import boundary_mask
    from distill.corpus import split_text
    from distill.data import Packer, stitch
    from distill.losses.common import alm_valid_chunks
    from distill.losses.units import adjacent_to_next, boundary_units, next_logprob
    from transplant.assets import load_vocab, texts
    from transplant.assets.sources import resolve_source

    torch.set_num_threads(args.threads)
    teacher, student = load_vocab("smollm2-135m"), load_vocab("mistral-v3")
    model = None
    if args.share_model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolve_source("smollm2-135m",
                                                                    need_model=True).model_dir,
                                                     dtype=torch.float32).eval()
    rows = []
    for name in args.share_texts:
        packer = Packer(split_text(texts.heldout(name, args.share_bytes)), teacher, student,
                        max_length=args.seq, shuffle=False)
        windows = []
        while packer.state.epoch == 0:
            windows.append(packer.next_window())
        alignment = stitch(windows, teacher, student)
        valid = alm_valid_chunks(alignment)
        n = int(valid.sum())
        row = {"text": name, "chunks": n,
               "raw_whitespace_mode": float((valid & ~alignment.chunk_followed_by_whitespace).sum()) / n}
        if model is not None:
            with torch.no_grad():
                logits = model(input_ids=alignment.teacher_input_ids,
                               attention_mask=alignment.teacher_attention_mask).logits
            logb = next_logprob(logits, alignment.teacher_chunk_last, valid, boundary_mask(teacher))
            likely = valid & (logb > torch.log(torch.tensor(args.threshold)))
            units = boundary_units(valid, logb, adjacent_to_next(alignment), args.threshold)
            last: dict[tuple[int, int], int] = {}  # (row, unit) -> its last chunk
            for b, c in zip(*torch.nonzero(valid, as_tuple=True)):
                last[(int(b), int(units[b, c]))] = int(c)
            closed_unlikely = sum(1 for (b, _), c in last.items() if not likely[b, c])
            row.update(units_per_chunk=len(last) / n,
                       units_closed_without_boundary=closed_unlikely / len(last),
                       chunks_with_likely_boundary=float(likely.sum()) / n, raw_merge_mode=0.0)
        row["followed_by_boundary_byte"] = float((valid & _followed_by(alignment, teacher)).sum()) / n
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(RECIPE), help="base recipe; the flags below override it")
    parser.add_argument("--losses", nargs="+", default=["alm", "ce", "uld"],
                        help="loss names, each optionally with recipe overrides: alm/loss.ce_weight=1")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="train.seed of each run (data order)")
    parser.add_argument("--export", action="store_true",
                        help="write each run's final model (for bench_chat_kept)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--embedding-lr", type=float, default=1e-3)
    parser.add_argument("--embedding-steps", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-bytes", type=int, default=8000)
    parser.add_argument("--train-bytes", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-texts", nargs="*", default=[],
                        help="held-out texts (texts:NAME); default: the recipe's eval.texts")
    parser.add_argument("--student", default="out/smollm2-mistral-v3",
                        help="transplanted student dir (created by the recipe's prepare step if missing)")
    parser.add_argument("--work", default=str(REPO / "bench" / "_work" / "healing"))
    parser.add_argument("--plot", default=None,
                        help="curves image (default: bench/healing.png; none with --report-only)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --work")
    parser.add_argument("--report-only", action="store_true",
                        help="only report the finished runs in --work (implies --reuse); nothing is trained")
    parser.add_argument("--ab-steps", type=int, default=0,
                        help="rounds of interleaved step timing (all losses on one trainer); 0 = skip")
    parser.add_argument("--skip-runs", action="store_true", help="only the interleaved timing")
    parser.add_argument("--debias-share", action="store_true",
                        help="only measure the share of chunks compared raw per debias mode (see "
                        "debias_share)")
    parser.add_argument("--share-texts", nargs="+", default=["english", "german", "code"])
    parser.add_argument("--share-bytes", type=int, default=16384)
    parser.add_argument("--share-model", action="store_true",
                        help="also run the teacher to merge as ALM does")
    parser.add_argument("--threshold", type=float, default=0.1, help="boundary_threshold of debias=merge")
    args = parser.parse_args()
    args.reuse = args.reuse or args.report_only
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.debias_share:
        (work / "debias_share.json").write_text(json.dumps(debias_share(args), indent=2))
        return 0
    if args.ab_steps:
        medians = interleaved_timing(args, work)
        (work / "timing.json").write_text(json.dumps(medians, indent=2))
        ce = medians.get("ce")
        print("\ninterleaved step timing (median s):")
        for loss, value in medians.items():
            print(f"  {loss}: {value:.2f}" + (f"  ({value / ce:.2f}x ce)" if ce else ""))
    if not args.skip_runs:
        arms: dict[str, list[dict]] = {arm: [] for arm in args.losses}
        for seed in args.seeds:  # seed-major: an interrupted sweep has every arm at the same seeds
            for arm in args.losses:
                if args.report_only and not finished(arm, args, work, seed):
                    continue
                arms[arm].append(summarise(arm, run_one(arm, args, work, seed)))
                if not args.report_only:
                    (work / "summary.json").write_text(json.dumps(arms, indent=2))
        arms = {arm: runs for arm, runs in arms.items() if runs}
        timing = json.loads((work / "timing.json").read_text()) if (work / "timing.json").exists() else None
        from distill.config import load_recipe

        trained = [t.removeprefix("texts:") for t in load_recipe(args.recipe, []).data.train]
        print(seed_report(arms, trained, timing))
        rows = [runs[0] for runs in arms.values()]
        print(table(rows))
        target = args.plot or (None if args.report_only else str(REPO / "bench" / "healing.png"))
        if target:  # a report of a few arms must not redraw the committed figure unasked
            plot(rows, Path(target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
