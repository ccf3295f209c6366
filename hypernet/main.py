"""`hypernet train RECIPE.yaml [key=value ...]` and `hypernet apply --hypernet DIR BASE DONOR OUTPUT`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from transplant.errors import TransplantError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3), the value parsed as YAML so numbers, bools and lists work."""
    import yaml

    if "=" not in text:
        raise TransplantError(f"override {text!r} is not key=value; write e.g. steps=100 or model.layers=3")
    key, value = text.split("=", 1)
    return key.split("."), yaml.safe_load(value)


def load_recipe(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise TransplantError(f"recipe {path} does not exist; see recipes/hypernet_smollm2_cpu.yaml")
    recipe = yaml.safe_load(path.read_text()) or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = recipe
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hypernet", description="Train or apply a tokenizer hypernetwork.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a hypernetwork from a YAML recipe")
    tr.add_argument("recipe")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=50 model.layers=3")
    ap = sub.add_parser("apply", help="give BASE the tokenizer of DONOR with hypernetwork-predicted embeddings")
    ap.add_argument("base")
    ap.add_argument("donor")
    ap.add_argument("output")
    ap.add_argument("--hypernet", required=True, help="dir written by `hypernet train`")
    ap.add_argument("--predict-shared", action="store_true", help="predict shared tokens too instead of copying")
    ap.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.command == "train":
            from hypernet.train import train

            out = train(load_recipe(args.recipe, args.overrides))
            print(f"hypernetwork written to {out}")
        else:
            import transplant

            result = transplant.transplant(args.base, args.donor, method="hypernet", output=args.output,
                                           overwrite=args.overwrite,
                                           options={"hypernet": args.hypernet, "predict_shared": args.predict_shared})
            print(f"wrote {result.output} ({result.stats.get('new', '?')} new tokens predicted)")
    except TransplantError as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
