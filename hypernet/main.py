"""`hypernet train RECIPE.yaml [--set key=value ...]`: train a ZeTT-style hypernetwork for a frozen base model.

Applying one is a transplant: `transplant --base BASE --donor TOKENIZER --method hypernet --set hypernet=DIR`.
"""

from __future__ import annotations

import click

from transplant.commandline import CONTEXT_SETTINGS, Group, set_option, setup_logging


@click.group("hypernet", cls=Group, context_settings=CONTEXT_SETTINGS)
def hypernet_main() -> None:
    """Train a hypernetwork that predicts embeddings for any tokenizer's tokens from a base model's own pieces.

    Apply a trained one with: transplant --base BASE --donor TOKENIZER --method hypernet --set hypernet=DIR
    """


@hypernet_main.command("train")
@click.argument("recipe", type=click.Path(path_type=str))
@set_option("max_minutes=12 (any recipe key, dotted: model.layers=3)")
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe (defaults and overrides) and exit.")
def train_cmd(recipe: str, settings: tuple[str, ...], print_recipe: bool) -> None:
    """Train a hypernetwork from RECIPE, a YAML file.

    Its keys are in hypernet/config.py (example: recipes/hypernet_smollm2_cpu.yaml); unknown keys and wrong
    types fail before the base model loads.
    """
    from hypernet.config import load_recipe

    loaded = load_recipe(recipe, settings)
    if print_recipe:
        import yaml

        click.echo(yaml.safe_dump(loaded.to_dict(), sort_keys=False), nl=False)
        return
    setup_logging(True, fmt="%(asctime)s %(name)s %(message)s")
    from hypernet.train import train

    click.echo(f"hypernetwork written to {train(loaded)}")
