"""`transplant()`: base model + donor tokenizer (+ donor model) -> a new model dir, with a summary.

The steps are the layers: assets (resolve names, load tokenizers), tokenizers (align), init (plan),
io (stream the surgery), eval (bits per byte, report). See docs/architecture.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transplant.assets import load_vocab
from transplant.assets.sources import resolve_source
from transplant.dtypes import parse_dtype
from transplant.errors import TransplantError
from transplant.eval.bpb import heldout_fidelity
from transplant.eval.card import hub_base_model, model_card
from transplant.eval.plots import render_report_plot
from transplant.eval.report import build_report, write_report
from transplant.init.apply import finish_embeddings
from transplant.init.base import InitContext, InitPlan
from transplant.init.numbers import digit_report
from transplant.init.registry import ResolvedMethod, available_methods, resolve_method
from transplant.io import surgery
from transplant.io.atomic import check_output, existing_paths
from transplant.io.chat_config import add_stop_tokens
from transplant.io.model_config import is_causal_lm
from transplant.tokenizers.align import align, shared_token_fraction
from transplant.tokenizers.control import apply_token_map, prepare_new_vocab, stop_token_ids
from transplant.tokenizers.vocab import Vocab

log = logging.getLogger(__name__)


@dataclass
class TransplantResult:
    output: Path
    method: str
    stats: dict[str, Any]
    seconds: float
    bpb_before: float | None = None
    bpb_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def default_method(donor_has_model: bool) -> str:
    """fvt-ls (with its default OMP gap pursuit and prior cap) with a donor model, byte-pool (FVT's rows for
    words with a leading space) without: the best measured training-free choices within 3 minutes
    (bench/RESULTS.md, "Default method", "The switched rows' logit prior", "The default without a donor
    model"); exact omp is ahead on English and code of SmolLM2 <- Gemma-3 but takes over 5 minutes there and
    loses German and Spanish."""
    return "fvt-ls" if donor_has_model and "fvt-ls" in available_methods() else "byte-pool"


def _special_ids(vocab: Vocab) -> dict[str, int | None]:
    return {f"{role}_token_id": vocab.roles.get(role) for role in ("bos", "eos", "pad", "unk")}


def new_embeddings(ctx: InitContext,
                   method: ResolvedMethod) -> tuple[torch.Tensor, torch.Tensor | None, InitPlan]:
    """The new input and output matrices (float32; output None when the result stays tied) and the plan.

    The method builds its plan; the pipeline's own steps then refine it for every method alike. Benches call
    this too (bench/bench_default.py), so what they measure is what `transplant()` writes.
    """
    return finish_embeddings(ctx, method.plan(ctx), method)  # numbers, tie, repaired rows


def transplant(base: str | Path, donor: str | Path, *, method: str | None = None,
               output: str | Path | None = None, device: str = "cpu", dtype: str | None = None,
               pad_to_multiple_of: int | None = None, overwrite: bool = False,
               eval_texts: dict[str, str] | Callable[[], dict[str, str]] | None = None,
               options: dict[str, Any] | None = None, revision: str | None = None,
               donor_revision: str | None = None, trust_remote_code: bool = False,
               chat_template: str = "auto", map_tokens: dict[str, str] | None = None) -> TransplantResult:
    """Give `base` the tokenizer of `donor`; returns where the new model is and how well it survived.

    `revision`/`donor_revision` pick a hub branch, tag or commit; `trust_remote_code` lets transformers run a
    hub tokenizer's own code (off by default). `chat_template` (auto|base|donor|none) and `map_tokens`
    ({NEW: BASE}) keep chat models chat-capable (`transplant.tokenizers.control`)."""
    started = time.perf_counter()
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    # the method is looked up and its options checked once: unknown methods, typos and bad values fail here
    user_options = dict(options or {})
    chosen = resolve_method(method, options) if method is not None else None
    base_src = resolve_source(base, need_model=True, revision=revision)
    # a hub donor brings its tokenizer files, plus only the shards holding its embeddings unless the chosen
    # method needs no donor model
    tokenizer_only_ok = chosen is not None and not chosen.needs_donor
    donor_src = resolve_source(donor, need_model=False, tokenizer_only_ok=tokenizer_only_ok,
                               revision=donor_revision)
    chosen = chosen or resolve_method(default_method(donor_src.is_model), options)
    if chosen.needs_donor and not donor_src.is_model:
        raise TransplantError(
            f"method {chosen.name!r} needs donor embeddings but {donor!s} is only a tokenizer; "
            "pass a donor model or use --method fvt"
        )
    method, options = chosen.name, dict(chosen.options)  # as reported (card, report.json, result)
    output = (Path(output) if output
              else Path("out") / f"{Path(str(base)).name}--{Path(str(donor)).name}-{method}")
    inputs = [p for p in (base_src.model_dir, donor_src.model_dir, Path(str(donor_src.tokenizer_spec)))
              if p and p.exists()]  # never overwritten, nor any folder holding them
    inputs += existing_paths(user_options.values())  # a hypernetwork or corpus given through --set
    check_output(output, overwrite=overwrite, protected=inputs)  # fail before loading or solving anything
    phases: dict[str, float] = {}  # where the whole-tool time goes (report.json, log)
    lap = _phase_clock(phases, started)
    lap("resolve")

    base_vocab = load_vocab(base_src.tokenizer_spec, trust_remote_code=trust_remote_code)
    new_vocab = load_vocab(donor_src.tokenizer_spec, trust_remote_code=trust_remote_code)
    if len(new_vocab) == 0:
        raise TransplantError(f"donor tokenizer {donor} has an empty vocabulary; pass a tokenizer that has "
                              "tokens")
    # + chat markers, family class
    new_vocab, chat = prepare_new_vocab(base_vocab, new_vocab, chat_template=chat_template,
                                        map_tokens=map_tokens, tokenizer_spec=donor_src.tokenizer_spec)
    check_output(output, overwrite=overwrite, protected=inputs,
                 estimate_bytes=surgery.estimate_output_bytes(base_src.model_dir, len(new_vocab),
                                                              dtype=torch_dtype))
    lap("load tokenizers")
    alignment = apply_token_map(align(base_vocab, new_vocab), base_vocab, new_vocab, map_tokens)
    lap("align")
    token_map = surgery.token_id_map(alignment.new_to_base, base_vocab.special_texts, len(base_vocab))
    surgery.check_token_ids(base_src.model_dir, _special_ids(new_vocab), token_map)  # e.g. image_token_index
    base_emb = surgery.read_embeddings(base_src.model_dir)
    if eval_texts and not is_causal_lm(base_emb.config):
        log.warning("bits per byte is measured on causal LMs only; %s is not one, so it is skipped", base)
        eval_texts = None
    if eval_texts and base_emb.rows_beyond_config:  # transformers refuses it; the output's config is right
        log.warning("transformers cannot load %s as it is (config.json and embedding rows disagree), so bits "
                    "per byte is skipped", base)
        eval_texts = None
    if base_emb.input.shape[0] < len(base_vocab):
        raise TransplantError(
            f"base embeddings have {base_emb.input.shape[0]} rows but its tokenizer has {len(base_vocab)} "
            "ids; the model and tokenizer do not belong together"
        )
    donor_input = donor_output = None
    if donor_src.is_model:
        donor_emb = surgery.read_embeddings(donor_src.model_dir)
        donor_input, donor_output = donor_emb.input, donor_emb.output
    lap("load embeddings")
    ctx = InitContext(
        base_vocab=base_vocab, new_vocab=new_vocab, alignment=alignment, base_input=base_emb.input.to(device),
        base_output=None if base_emb.output is None else base_emb.output.to(device),
        donor_input=None if donor_input is None else donor_input.to(device),
        donor_output=None if donor_output is None else donor_output.to(device), options=options,
        device=device, base_model_dir=base_src.model_dir if is_causal_lm(base_emb.config) else None,
        trust_remote_code=trust_remote_code,
    )
    new_input, new_output, plan = new_embeddings(ctx, chosen)
    lap("solve")

    stats = {**alignment.stats(len(base_vocab)), **digit_report(base_vocab, new_vocab),
             **plan.notes["repairs"].stats()}
    if callable(eval_texts):  # fetched only once the inputs are known to be good
        eval_texts = eval_texts()
    sample = next(iter((eval_texts or {}).values()), None)
    if sample:
        stats["shared_token_fraction_on_sample"] = round(shared_token_fraction(alignment, new_vocab, sample),
                                                         4)
    comparable = heldout_fidelity(stats, eval_texts or {}, base_vocab.tokenizer, new_vocab.tokenizer)
    card = model_card(base=str(base), donor=str(donor), method=method, stats=stats, options=options,
                          base_dir=base_src.model_dir, chat=chat.as_dict())
    result = TransplantResult(output, method, stats, 0.0, extra={"notes": plan.notes, "chat": chat})

    def evaluate_and_report(model_dir: Path) -> None:
        """Runs on the finished folder before it is renamed into place: a failure here leaves no output."""
        result.seconds = time.perf_counter() - started  # the transplant itself, evaluation excluded
        lap("write")
        bpb = {}
        if eval_texts:
            from transplant.eval.bpb import model_bits_per_byte

            # a lossy tokenizer is not scored
            measured = {n: t for n, t in eval_texts.items() if n in comparable}
            for name, text in measured.items():
                bpb[name] = {"before": model_bits_per_byte(base_src.model_dir, text, device=device,
                                                           trust_remote_code=trust_remote_code),
                             "after": model_bits_per_byte(model_dir, text, device=device,
                                                          trust_remote_code=trust_remote_code)}
            total_bytes = sum(len(t.encode()) for t in measured.values())
            for key, attr in (("before", "bpb_before"), ("after", "bpb_after")):
                if total_bytes:
                    setattr(result, attr,
                            sum(bpb[n][key] * len(t.encode()) for n, t in measured.items()) / total_bytes)
        report = build_report(base=str(base), donor=str(donor), method=method, stats=stats, plan=plan,
                              base_vocab=base_vocab, new_vocab=new_vocab,
                              new_ids=alignment.unshared_new_ids.tolist(), seconds=result.seconds, bpb=bpb,
                              options=options)
        report["chat"] = chat.as_dict()
        report["seconds_by_phase"] = {name: round(value, 2) for name, value in phases.items()}
        log.info("time split: %s", ", ".join(f"{name} {value:.1f} s" for name, value in phases.items()))
        add_stop_tokens(model_dir, stop_token_ids(new_vocab, chat))  # a chat reply ends at <|im_end|> too
        write_report(model_dir, report, render_report_plot(plan, alignment.unshared_new_ids))
        result.extra["report"] = report

    surgery.write_transplanted(
        base_src.model_dir, output, new_input=new_input.cpu(),
        new_output=None if new_output is None
        else new_output.cpu(), save_tokenizer=new_vocab.save, special_ids=_special_ids(new_vocab),
        model_card=card, dtype=torch_dtype, pad_to_multiple_of=pad_to_multiple_of, overwrite=overwrite,
        before_commit=evaluate_and_report, protected=inputs, token_map=token_map,
        name_or_path=hub_base_model(str(base)),
        vocab_rows=surgery.sparse_composer(plan.input_weights if plan.output_weights is None
                                           else plan.output_weights),
    )
    result.extra["seconds_by_phase"] = phases
    return result


def _phase_clock(phases: dict[str, float], started: float) -> Callable[[str], None]:
    """`lap(name)` records the seconds since the previous lap (the first: since `started`) under `name`."""
    last = [started]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - last[0]
        last[0] = now
    return lap
