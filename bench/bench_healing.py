"""Healing benchmark: SmolLM2-135M given the Mistral v3 tokenizer (training-free fvt init), then the same
budget of steps with each distillation objective; held-out bits/byte versus steps, and step time.

Each objective runs as its own `distill` process (same recipe, only `loss.name` differs), so timings and peak
memory are per run. The teacher is the original SmolLM2-135M (self-distillation); plain CE needs no teacher and
skips its forward, so "ALM / CE step time" is the whole price of distillation (teacher forward, alignment in
the data loader, chunk loss).

    python bench/bench_healing.py --steps 60 --seq 256 --batch 4      # ~ (3 x steps x step time) on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_smoke_smollm2_mistral.yaml"


def run_one(loss: str, args: argparse.Namespace, work: Path) -> list[dict]:
    out = work / loss
    metrics = out / "metrics.jsonl"
    if args.reuse and metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        if any(r.get("step") == args.steps and "loss" in r for r in records):
            return records
    sets = {
        "output_dir": str(out), "student.path": args.student, "loss.name": loss, "train.steps": args.steps,
        "train.micro_batch_size": args.batch, "train.grad_accum": 1, "data.max_length": args.seq,
        "data.train_bytes": args.train_bytes, "eval.every": args.eval_every, "eval.n_bytes": args.eval_bytes,
        "train.embeddings_only_steps": args.embedding_steps, "checkpoint.every": 0, "export.enabled": False,
        "train.log_every": 10, "optim.lr": args.lr, "optim.embedding_lr": args.embedding_lr,
    }
    command = [sys.executable, "-m", "distill.main", str(args.recipe)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    print(f"{loss}: {time.perf_counter() - started:.0f} s", flush=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def summarise(loss: str, records: list[dict]) -> dict:
    steps = [r for r in records if "step_time" in r]
    evals = {r["step"]: r["eval_bpb_all"] for r in records if "eval_bpb_all" in r}
    times = [r["step_time"] for r in steps[2:]] or [r["step_time"] for r in steps]
    return {"loss": loss, "steps": len(steps), "median_step_s": statistics.median(times),
            "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in steps), "bpb": evals,
            "teacher_bpb": next((r["teacher_bpb_all"] for r in records if "teacher_bpb_all" in r), None),
            "first_loss": steps[0]["loss"], "last_loss": statistics.mean(r["loss"] for r in steps[-5:])}


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
    times: dict[str, list[float]] = {loss: [] for loss in args.losses}
    for round_ in range(args.ab_steps + 1):
        for loss in args.losses:
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
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        steps = sorted(row["bpb"])
        ax.plot(steps, [row["bpb"][s] for s in steps], marker="o", label=row["loss"])
    teacher = next((r["teacher_bpb"] for r in rows if r["teacher_bpb"] is not None), None)
    if teacher is not None:
        ax.axhline(teacher, color="gray", linestyle="--", label="teacher (original tokenizer)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out bits/byte (english)")
    ax.set_title("SmolLM2-135M -> Mistral v3 tokenizer (fvt), healing")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(RECIPE), help="base recipe; the flags below override it")
    parser.add_argument("--losses", nargs="+", default=["alm", "ce", "uld"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--embedding-lr", type=float, default=1e-3)
    parser.add_argument("--embedding-steps", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-bytes", type=int, default=8000)
    parser.add_argument("--train-bytes", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--student", default="out/smollm2-mistral-v3",
                        help="transplanted student dir (created by the recipe's prepare step if missing)")
    parser.add_argument("--work", default=str(REPO / "bench" / "_work" / "healing"))
    parser.add_argument("--plot", default=str(REPO / "bench" / "healing.png"))
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --work")
    parser.add_argument("--ab-steps", type=int, default=0,
                        help="rounds of interleaved step timing (all losses on one trainer); 0 = skip")
    parser.add_argument("--skip-runs", action="store_true", help="only the interleaved timing")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_runs:
        rows = [summarise(loss, run_one(loss, args, work)) for loss in args.losses]
        (work / "summary.json").write_text(json.dumps(rows, indent=2))
        print(table(rows))
        plot(rows, Path(args.plot))
    if args.ab_steps:
        medians = interleaved_timing(args, work)
        (work / "timing.json").write_text(json.dumps(medians, indent=2))
        ce = medians.get("ce")
        print("\ninterleaved step timing (median s):")
        for loss, value in medians.items():
            print(f"  {loss}: {value:.2f}" + (f"  ({value / ce:.2f}x ce)" if ce else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
