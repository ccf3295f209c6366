"""`hypernet train RECIPE.yaml [--set key=value ...]`: train a ZeTT-style hypernetwork for a frozen base model.

Applying one is a transplant: `transplant --base BASE --donor TOKENIZER --method hypernet --set hypernet=DIR`.
Runs under plain python (a world of one, or a torchrun relaunch when the recipe asks for `nproc` > 1), under
`torchrun --nproc_per_node N -m hypernet.main train ...` and under the deepspeed launcher.
"""

from __future__ import annotations

import os
import subprocess
import sys

import click

from transplant.commandline import CONTEXT_SETTINGS, Group, set_option, setup_logging


@click.group("hypernet", cls=Group, context_settings=CONTEXT_SETTINGS)
def hypernet_main() -> None:
    """Train a hypernetwork that predicts embeddings for any tokenizer's tokens from a base model's own pieces.

    Apply a trained one with: transplant --base BASE --donor TOKENIZER --method hypernet --set hypernet=DIR
    """


def _relaunch(argv: list[str], nproc: int) -> int:
    """Run this same command under torchrun with `nproc` processes (the recipe asked for several)."""
    from distill.runtime import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "hypernet.main", *argv]
    return subprocess.call(command)


@hypernet_main.command("train")
@click.argument("recipe", type=click.Path(path_type=str))
@set_option("max_minutes=12 (any recipe key, dotted: model.layers=3)")
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe (defaults and overrides) and exit.")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher; read from LOCAL_RANK otherwise.")
def train_cmd(recipe: str, settings: tuple[str, ...], print_recipe: bool, local_rank: int | None) -> None:
    """Train a hypernetwork from RECIPE, a YAML file.

    Its keys are in hypernet/config.py (examples: recipes/hypernet_*.yaml); unknown keys and wrong types fail
    before the base model loads. `--set nproc=N` trains data-parallel on N processes of this machine.
    """
    from hypernet.config import load_recipe

    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    loaded = load_recipe(recipe, settings)
    if print_recipe:
        import yaml

        click.echo(yaml.safe_dump(loaded.to_dict(), sort_keys=False), nl=False)
        return
    if "WORLD_SIZE" not in os.environ and loaded.nproc > 1:
        from transplant.assets import load_vocab
        from transplant.assets.catalog import resolve_model

        for spec in [resolve_model(loaded.base), *loaded.real_tokenizers]:  # fetch/convert once, not per process
            load_vocab(spec)
        argv = ["train", recipe, *(arg for text in settings for arg in ("--set", text))]
        click.get_current_context().exit(_relaunch(argv, loaded.nproc))
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank == 0, fmt="%(asctime)s %(name)s %(message)s")
    from hypernet.train import train

    out = train(loaded)
    if rank == 0:
        click.echo(f"hypernetwork written to {out}")


if __name__ == "__main__":
    hypernet_main()
