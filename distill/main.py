"""`distill RECIPE.yaml [--set key=value ...] [--resume]`: heal a transplanted model by distillation.

Works under any launcher: plain python (a world of one, or a torchrun relaunch when the recipe asks for
`launch.nproc_per_node` > 1), `torchrun --nproc_per_node N -m distill.main ...`, or
`deepspeed --num_gpus N --module distill.main ...` (which adds `--local_rank`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import click

from transplant.commandline import CONTEXT_SETTINGS, Command, set_option, setup_logging

log = logging.getLogger("distill")


class DistillCommand(Command):
    """`distill --help` ends with the registered losses (read at help time, so a new loss shows up by itself)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from distill.losses import LOSSES

        with formatter.section("Losses (--set loss.name=NAME)"):
            formatter.write_text(", ".join(sorted(LOSSES)))
        super().format_epilog(ctx, formatter)


def _configure_logging() -> None:
    """Rank 0 logs progress; the other ranks only warnings (N copies of every line help nobody)."""
    setup_logging(int(os.environ.get("RANK", "0")) == 0, fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _relaunch(argv: list[str], nproc: int, port: int) -> int:
    """Run this same command under torchrun with `nproc` processes (the recipe asked for several)."""
    from distill.runtime import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
               "-m", "distill.main", *argv]
    log.info("launching %d processes: %s", nproc, " ".join(command))
    return subprocess.call(command)


@click.command("distill", cls=DistillCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("recipe", type=click.Path(path_type=str))
@set_option("train.steps=10 (any recipe key, dotted)")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint (same as --set train.resume=true).")
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe (defaults, overrides, ${...}) and exit.")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher; read from LOCAL_RANK otherwise.")
def distill_main(recipe: str, settings: tuple[str, ...], resume: bool, print_recipe: bool,
                 local_rank: int | None) -> None:
    """Heal a transplanted model by cross-tokenizer distillation, as RECIPE (a YAML file, see recipes/) says.

    Keys of the recipe are documented in distill/config.py; unknown keys and wrong types fail before any model
    loads. Runs under plain python (torchrun is started when launch.nproc_per_node > 1), torchrun and deepspeed.
    """
    from distill.config import load_recipe

    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    _configure_logging()
    overrides = list(settings) + (["train.resume=true"] if resume else [])
    loaded = load_recipe(recipe, overrides)
    if print_recipe:
        import yaml

        click.echo(yaml.safe_dump(loaded.to_dict(), sort_keys=False), nl=False)
        return
    if "WORLD_SIZE" not in os.environ and loaded.launch.nproc_per_node > 1:
        if not Path(loaded.student.path).exists():
            from distill.trainer import prepare_student

            prepare_student(loaded, is_main=True)  # once, before the workers start
        argv = [recipe, *(arg for text in settings for arg in ("--set", text))] + (["--resume"] if resume else [])
        click.get_current_context().exit(_relaunch(argv, loaded.launch.nproc_per_node, loaded.launch.master_port))
    from distill.trainer import run

    result = run(loaded)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result["history"][-1] if result["history"] else {}
        summary = {k: round(v, 4) for k, v in last.items() if k.startswith(("loss", "eval_bpb_all"))}
        click.echo(f"distill: {result['steps']} steps {summary} -> {result['export']}")


if __name__ == "__main__":
    distill_main()
