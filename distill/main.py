"""`distill RECIPE.yaml [--set key=value ...] [--resume]`: heal a transplanted model by distillation.

Works under any launcher: plain python (a world of one, or a torchrun relaunch when the recipe asks for
`launch.nproc_per_node` > 1), `torchrun --nproc_per_node N -m distill.main ...`, or
`deepspeed --num_gpus N --module distill.main ...` (which adds `--local_rank`).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from distill.config import load_recipe
from transplant.errors import TransplantError

log = logging.getLogger("distill")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.steps=10 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _configure_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _relaunch(argv: list[str], nproc: int, port: int) -> int:
    """Run this same command under torchrun with `nproc` processes (the recipe asked for several)."""
    from distill.runtime import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
               "-m", "distill.main", *argv]
    log.info("launching %d processes: %s", nproc, " ".join(command))
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    _configure_logging()
    try:
        overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
        recipe = load_recipe(args.recipe, overrides)
        if args.print_recipe:
            import yaml

            sys.stdout.write(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            return 0
        if "WORLD_SIZE" not in os.environ and recipe.launch.nproc_per_node > 1:
            if not Path(recipe.student.path).exists():
                from distill.trainer import prepare_student

                prepare_student(recipe, is_main=True)  # once, before the workers start
            return _relaunch(argv, recipe.launch.nproc_per_node, recipe.launch.master_port)
        from distill.trainer import run

        result = run(recipe)
    except TransplantError as err:
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        last = result["history"][-1] if result["history"] else {}
        summary = {k: round(v, 4) for k, v in last.items() if k.startswith(("loss", "eval_bpb_all"))}
        sys.stdout.write(f"distill: {result['steps']} steps {summary} -> {result['export']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
