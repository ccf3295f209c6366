"""Random-weight models of the real shapes, for GPU timing runs on a machine that cannot hold real weights.

A GPU lease here carries at most 64 MiB and reaches no hub, while SmolLM2-135M is 98 MB even as a Q4 GGUF.
Step time and tokens/s depend on shapes and dtypes, not on weight values, so the timing runs build models from
the real config.json and tokenizer files with random weights. Quality numbers never come from these models.

    python bench/random_models.py SHAPE_DIR OUT_DIR [--dtype bfloat16] [--set hidden_size=2048 ...]

SHAPE_DIR holds config.json plus tokenizer files; a `tokenizer.json.gz` is unpacked (Gemma's is 33 MB raw).
`--set KEY=VALUE` overrides config keys (JSON values), so one small model's folder gives a bigger model of the
same architecture and tokenizer: SmolLM2-135M's Llama config with Llama-3.2-1B's widths and depth is the 1B
Llama-shaped model of the GPU distillation check (bench/gpu_checks.sh, section distill1b).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`KEY=VALUE` strings as config overrides; VALUE is JSON (2048, true, "silu"), else the plain string."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set needs KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def random_model(shape_dir: Path, out_dir: Path, dtype: torch.dtype,
                 overrides: dict[str, object] | None = None) -> int:
    """Write OUT_DIR: a model with the shape in SHAPE_DIR's config.json (with `overrides`), seeded random
    weights, its tokenizer. Returns the parameter count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(shape_dir)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    parameters = sum(t.numel() for t in model.parameters())
    for path in shape_dir.iterdir():
        if path.name == "config.json" or path.suffix == ".safetensors":
            continue
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as src, open(out_dir / path.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif path.is_file():
            shutil.copy2(path, out_dir / path.name)
    return parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set num_hidden_layers=16")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    parameters = random_model(args.shape_dir, args.out_dir, getattr(torch, args.dtype), overrides)
    print(f"{args.out_dir}: random {args.dtype} model of {args.shape_dir} {overrides or ''}, "
          f"{parameters / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
