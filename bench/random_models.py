"""Random-weight models of the real shapes, for GPU timing runs on a machine that cannot hold real weights.

A GPU lease here carries at most 64 MiB and reaches no hub, while SmolLM2-135M is 98 MB even as a Q4 GGUF.
Step time and tokens/s depend on shapes and dtypes, not on weight values, so the timing runs build models from
the real config.json and tokenizer files with random weights. Quality numbers never come from these models.

    python bench/random_models.py SHAPE_DIR OUT_DIR [--dtype bfloat16]

SHAPE_DIR holds config.json plus tokenizer files; a `tokenizer.json.gz` is unpacked (Gemma's is 33 MB raw).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def random_model(shape_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Write OUT_DIR: a model with the shape in SHAPE_DIR's config.json, seeded random weights, its
    tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(shape_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    for path in shape_dir.iterdir():
        if path.name == "config.json" or path.suffix == ".safetensors":
            continue
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as src, open(out_dir / path.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif path.is_file():
            shutil.copy2(path, out_dir / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    random_model(args.shape_dir, args.out_dir, getattr(torch, args.dtype))
    print(f"{args.out_dir}: random {args.dtype} model of {args.shape_dir}")


if __name__ == "__main__":
    main()
