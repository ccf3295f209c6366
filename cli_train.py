"""The training command lines: `distill RECIPE` and `hypernet train RECIPE` (cli.py holds `transplant`).

Both read a YAML recipe, fail on unknown keys before any model loads, and relaunch themselves on N local
processes when the recipe asks for more than one (`cli_helpers.relaunch`); `python -m cli distill ...` is the
module entry launchers use.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from cli_helpers import (
    CONTEXT_SETTINGS,
    LOCAL_RANK,
    PRIVATE,
    PUSH_TO_HUB,
    Command,
    Group,
    adopt_local_rank,
    push_output,
    rank,
    relaunch,
    set_option,
    setup_rank_logging,
)
from transplant.errors import TransplantError

__all__ = ["distill_main", "hypernet_main"]


# ------------------------------------------------------------------------------------------------ distill
class DistillCommand(Command):
    """`distill --help` ends with the registered losses (read at help time, so a new loss shows up by
    itself)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from distill.losses import available_losses

        with formatter.section("Losses (--set loss.name=NAME)"):
            formatter.write_text(", ".join(available_losses()))
        super().format_epilog(ctx, formatter)


def _as_argv(settings: tuple[str, ...]) -> list[str]:
    return [arg for text in settings for arg in ("--set", text)]


def _print_recipe(recipe) -> None:
    import yaml

    click.echo(yaml.safe_dump(recipe.to_dict(), sort_keys=False), nl=False)


@click.command("distill", cls=DistillCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("recipe", type=click.Path(path_type=str))
@set_option("train.steps=10 (any recipe key, dotted)")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint (same as --set "
              "train.resume=true); an error when there is none.")
@click.option("--print-recipe", is_flag=True,
              help="Print the resolved recipe (defaults, overrides, ${...}) and exit.")
@PUSH_TO_HUB
@PRIVATE
@LOCAL_RANK
def distill_main(recipe: str, settings: tuple[str, ...], resume: bool, print_recipe: bool,
                 push_to_hub: str | None, private: bool, local_rank: int | None) -> None:
    """Heal a transplanted model by cross-tokenizer distillation, as RECIPE (a YAML file, see recipes/) says.

    Keys of the recipe are documented in distill/config.py; unknown keys and wrong types fail before any model
    loads. Runs under plain python (torchrun is started when launch.nproc_per_node > 1), torchrun and
    deepspeed (`python -m cli distill RECIPE` is the module to give them).
    """
    from distill.config import load_recipe

    adopt_local_rank(local_rank)
    setup_rank_logging()
    loaded = load_recipe(recipe, list(settings) + (["train.resume=true"] if resume else []))
    if print_recipe:
        return _print_recipe(loaded)
    if push_to_hub and not loaded.export.enabled:
        raise TransplantError("--push-to-hub uploads the exported model, but the recipe has export.enabled="
                              "false; drop --push-to-hub or --set export.enabled=true")
    from transplant.io.publish import check_push

    check_push(push_to_hub)
    if "WORLD_SIZE" not in os.environ and loaded.launch.nproc_per_node > 1:
        from distill.export import claim_terms
        from distill.student import prepare_student
        from transplant.io.claim import check_claim

        # the output folder is judged before the student is built (minutes) and the workers start
        check_claim(loaded.output_dir, **claim_terms(loaded, [loaded.teacher.path, loaded.student.path]))
        prepare_student(loaded, is_main=True)  # once, before the workers start
        argv = ["distill", recipe, *_as_argv(settings)] + (["--resume"] if resume else [])
        argv += ["--push-to-hub", push_to_hub] + (["--private"] if private else []) if push_to_hub else []
        click.get_current_context().exit(relaunch(argv, loaded.launch.nproc_per_node,
                                                  loaded.launch.master_port))
    from distill.trainer import run

    result = run(loaded)
    if rank() == 0:
        last = result["history"][-1] if result["history"] else {}
        summary = {k: round(v, 4) for k, v in last.items() if k.startswith(("loss", "eval_bpb_all"))}
        click.echo(f"distill: {result['steps']} steps {summary} -> {result['export']}")
        from distill.corpus import source_names
        from distill.scores import format_run_healing

        healing = format_run_healing(result["history"], source_names(loaded.data.train))
        if healing:
            click.echo(f"healing: {healing}")
        if result["export"] is not None:
            push_output(Path(result["export"]), push_to_hub, private)


# ------------------------------------------------------------------------------------------------ hypernet
@click.group("hypernet", cls=Group, context_settings=CONTEXT_SETTINGS)
def hypernet_main() -> None:
    """Train a hypernetwork that predicts embeddings for any tokenizer's tokens from a base model's own
    pieces.

    Apply a trained one with: transplant --base BASE --donor TOKENIZER --method hypernet --set hypernet=DIR
    """


@hypernet_main.command("train")
@click.argument("recipe", type=click.Path(path_type=str))
@set_option("max_minutes=12 (any recipe key, dotted: model.layers=3)")
@click.option("--print-recipe", is_flag=True,
              help="Print the resolved recipe (defaults and overrides) and exit.")
@LOCAL_RANK
def hypernet_train_cmd(recipe: str, settings: tuple[str, ...], print_recipe: bool,
                       local_rank: int | None) -> None:
    """Train a hypernetwork from RECIPE, a YAML file.

    Its keys are in hypernet/config.py (examples: recipes/hypernet_*.yaml); unknown keys and wrong types fail
    before the base model loads. `--set nproc=N` trains data-parallel on N processes of this machine.
    """
    from hypernet.config import load_recipe

    adopt_local_rank(local_rank)
    loaded = load_recipe(recipe, settings)
    if print_recipe:
        return _print_recipe(loaded)
    if "WORLD_SIZE" not in os.environ and loaded.nproc > 1:
        from transplant.assets import load_vocab
        from transplant.assets.catalog import resolve_model

        # fetch/convert once, not per process
        for spec in [resolve_model(loaded.base), *loaded.real_tokenizers]:
            load_vocab(spec)
        click.get_current_context().exit(relaunch(["hypernet", "train", recipe, *_as_argv(settings)],
                                                  loaded.nproc))
    setup_rank_logging()
    from hypernet.train import train

    out = train(loaded)
    if rank() == 0:
        click.echo(f"hypernetwork written to {out}")
