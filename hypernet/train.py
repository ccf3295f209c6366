"""Train a hypernetwork for a frozen base LM on randomly sampled tokenizers (ZeTT's recipe, scaled down).

Per step: (every `resample_every` steps) draw a tokenizer; cut random text windows and tokenize them with it;
predict input/output rows for the tokens of the batch only; run the frozen base LM on the predicted input
embeddings and score the next token against the output rows of a *vocabulary subset*: the batch's tokens plus
`negatives` random ids of the sampled vocabulary.

Approximation (documented on purpose): the softmax runs over that subset, not the full sampled vocabulary; the
random negatives' logits are raised by log((V - b) / m) (m negatives standing for the V - b tokens outside the
batch) so the subset's partition function is an estimate of the full one (sampled softmax, Jean et al. 2015).
This is what makes a step cost O(batch vocabulary) instead of O(vocabulary).

Tokens whose bytes exist in the base vocabulary are copied (as at apply time) unless `predict_shared` is set.
`lm_every: N` runs the (expensive) LM loss only every N-th step; on a CPU the LM forward+backward of a 135M model
costs tens of seconds per step, the auxiliary loss milliseconds.
An auxiliary loss regresses predictions for base tokens (decomposed into strictly shorter base pieces, see
`decompose_without_self`) onto their original rows: cheap, dense supervision that dominates early training on CPU.

Checkpoints: `<output>/checkpoint/` holds hypernet.safetensors + config.json (a usable hypernetwork),
optimizer.safetensors and state.json (step, RNG states, losses); `resume: true` continues from it. The final
hypernetwork is written to `<output>/` itself. DeepSpeed is not used (the trainable part is ~2M parameters).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hypernet.config import HypernetRecipe
from hypernet.model import (
    Hypernet,
    HypernetConfig,
    base_stats,
    decompose,
    decompose_without_self,
    load_hypernet,
    save_hypernet,
)
from hypernet.sample import TokenizerSampler, TrainTokenizer
from transplant.assets import load_vocab
from transplant.tokenizers.vocab import TokenKind, Vocab

log = logging.getLogger(__name__)

class TokenizerPieces:
    """A sampled tokenizer with its ids decomposed into base pieces once (the per-step work is then indexing)."""

    def __init__(self, tok: TrainTokenizer, base: Vocab, max_pieces: int):
        self.tok = tok
        self.ids, self.mask = decompose(base, tok.token_bytes, max_pieces)
        base_ids = [base.bytes_to_id.get(b, -1) if b else -1 for b in tok.token_bytes]
        self.base_id = torch.tensor(base_ids, dtype=torch.long)  # -1: not in the base vocabulary
        self.has_pieces = self.mask.any(1)


def _corpus(spec: dict[str, int] | str) -> str:
    if isinstance(spec, str):
        from transplant.commandline import read_text_file

        return read_text_file(Path(spec), "corpus")
    from transplant.assets.texts import train_text

    return "".join(train_text(name, int(n)) for name, n in spec.items())


def _windows(corpus: str, count: int, chars: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(count):
        start = rng.randrange(0, max(1, len(corpus) - chars))
        out.append(corpus[start : start + chars])
    return out


def lm_loss(lm, net: Hypernet, pieces: TokenizerPieces, texts: list[str], *, seq_len: int, negatives: int,
            bos_row: torch.Tensor | None, base_in: torch.Tensor, base_out: torch.Tensor | None,
            predict_shared: bool, gen: torch.Generator) -> torch.Tensor:
    """Next-token cross-entropy of the frozen LM over the batch-vocabulary subset (see module docstring)."""
    seqs = [ids[:seq_len] for ids in pieces.tok.encode_batch(texts)]
    seqs = [s for s in seqs if len(s) >= 2]
    width = max(len(s) for s in seqs)
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for row, s in enumerate(seqs):
        batch[row, : len(s)] = torch.tensor(s)
        valid[row, : len(s)] = True
    vocab_size = len(pieces.tok)
    extra = torch.randint(0, vocab_size, (negatives,), generator=gen)
    subset = torch.unique(torch.cat([batch[valid], extra]))
    subset = subset[pieces.has_pieces[subset]]
    keep = valid & pieces.has_pieces[batch]
    local = torch.full((vocab_size,), 0, dtype=torch.long)
    local[subset] = torch.arange(subset.numel())
    rows_in, rows_out = net(pieces.ids[subset], pieces.mask[subset], base_in, base_out)
    if not predict_shared:  # copy shared tokens, exactly as the `hypernet` init method does
        base_ids = pieces.base_id[subset]
        shared = base_ids >= 0
        rows_in = torch.where(shared[:, None], base_in[base_ids.clamp_min(0)].float(), rows_in)
        out_src = base_out if base_out is not None else base_in
        rows_out = torch.where(shared[:, None], out_src[base_ids.clamp_min(0)].float(), rows_out)
    embeds = rows_in[local[batch]]
    if bos_row is not None:
        embeds = torch.cat([bos_row.float().expand(len(seqs), 1, -1), embeds], 1)
        targets, tmask = local[batch], keep
        attn = torch.cat([torch.ones(len(seqs), 1, dtype=torch.bool), valid], 1)
        hidden = lm.model(inputs_embeds=embeds, attention_mask=attn.long()).last_hidden_state[:, :-1]
    else:
        targets, tmask = local[batch][:, 1:], keep[:, 1:]
        hidden = lm.model(inputs_embeds=embeds, attention_mask=valid.long()).last_hidden_state[:, :-1]
    logits = hidden[tmask] @ rows_out.T
    # Sampled-softmax correction: each random negative stands for (V - b) / m tokens of the vocabulary outside
    # the batch, so the subset's partition function estimates the full one. Without it the loss rewards pushing
    # every predicted output row up against a tiny field of negatives, which at apply time (full softmax)
    # over-predicts new tokens: a 1000-step run got worse than FVT on code (bench/RESULTS.md, Hypernetwork).
    in_batch = torch.zeros(vocab_size, dtype=torch.bool)
    in_batch[batch[valid]] = True
    outside = ~in_batch[subset]
    n_outside, population = int(outside.sum()), int((pieces.has_pieces & ~in_batch).sum())
    if n_outside:
        logits = logits + outside.float() * math.log(max(population, n_outside) / n_outside)
    return F.cross_entropy(logits, targets[tmask])


def aux_loss(net: Hypernet, base_ids: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, base_in: torch.Tensor,
             base_out: torch.Tensor | None) -> torch.Tensor:
    """Normalised MSE + cosine distance of predicted rows of base tokens to their true rows."""
    pred_in, pred_out = net(ids, mask, base_in, base_out)
    loss = _regression(pred_in, base_in[base_ids].float())
    if base_out is not None:
        loss = loss + _regression(pred_out, base_out[base_ids].float())
    return loss


def _regression(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mse = (pred - target).pow(2).mean() / target.var().clamp_min(1e-8)
    return mse + (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


def _aux_population(base: Vocab) -> list[int]:
    return [i for i, (b, k) in enumerate(zip(base.token_bytes, base.kinds)) if k is TokenKind.NORMAL and len(b) >= 2]


def _save_state(out: Path, net: Hypernet, opt: torch.optim.Optimizer, state: dict, rng: random.Random,
                gen: torch.Generator) -> None:
    ckpt = out / "checkpoint"
    save_hypernet(net, ckpt)
    tensors, groups = {}, []
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"state.{idx}.{key}"] = torch.as_tensor(value).clone().contiguous()
    for group in sd["param_groups"]:
        groups.append({k: v for k, v in group.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.gen"] = gen.get_state()
    save_file(tensors, str(ckpt / "optimizer.safetensors.tmp"))
    (ckpt / "optimizer.safetensors.tmp").replace(ckpt / "optimizer.safetensors")
    py_state = rng.getstate()
    payload = {**state, "param_groups": groups, "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}
    (ckpt / "state.json.tmp").write_text(json.dumps(payload))
    (ckpt / "state.json.tmp").replace(ckpt / "state.json")


def _load_state(out: Path, net: Hypernet, opt: torch.optim.Optimizer, rng: random.Random,
                gen: torch.Generator) -> dict:
    ckpt = out / "checkpoint"
    net.load_state_dict(load_hypernet(ckpt).state_dict())
    payload = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": payload.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.gen"])
    version, internal, gauss = payload.pop("python_rng")
    rng.setstate((version, tuple(internal), gauss))
    return payload


def train(recipe: HypernetRecipe) -> Path:
    """Run a recipe (hypernet.config; e.g. recipes/hypernet_smollm2_cpu.yaml); returns the output dir holding
    the hypernetwork."""
    from transformers import AutoModelForCausalLM

    from transplant.assets.catalog import resolve_model

    if recipe.threads:
        torch.set_num_threads(int(recipe.threads))
    out = Path(recipe.output_dir)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    base_dir = resolve_model(recipe.base)
    base = load_vocab(base_dir)
    lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    lm.requires_grad_(False)
    base_in = lm.get_input_embeddings().weight.detach()
    tied = lm.config.tie_word_embeddings or lm.get_output_embeddings() is None
    base_out = None if tied else lm.get_output_embeddings().weight.detach()
    hcfg = HypernetConfig(base_dim=base_in.shape[1], base_vocab_size=base_in.shape[0], untied=not tied,
                          base_name=str(recipe.base), **asdict(recipe.model))
    net = Hypernet(hcfg, *base_stats(base_in, base_out))
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    state: dict[str, Any] = {"step": 0, "history": []}
    if recipe.resume and (out / "checkpoint" / "state.json").exists():
        state = _load_state(out, net, opt, rng, gen)
        log.info("resumed at step %d", state["step"])
    corpus = _corpus(recipe.corpus)
    real = [load_vocab(spec) for spec in recipe.real_tokenizers]
    sampler = TokenizerSampler(corpus, size_range=tuple(recipe.vocab_size), noise=recipe.noise, real=real,
                               real_prob=recipe.real_prob, seed=recipe.seed + state["step"])
    population = torch.tensor(_aux_population(base), dtype=torch.long)
    bos = base.roles.get("bos", base.roles.get("eos"))
    bos_row = base_in[bos] if bos is not None else None
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, recipe.warmup)), last_epoch=state["step"] - 1)
    started = time.perf_counter()
    pieces = None
    running: dict[str, float] = {}
    net.train()
    while state["step"] < recipe.steps:
        step = state["step"]
        if pieces is None or step % recipe.resample_every == 0:
            pieces = TokenizerPieces(sampler.sample(), base, hcfg.max_pieces)
        loss = torch.zeros(())
        parts = {}
        if recipe.lm_weight > 0 and step % recipe.lm_every == 0:
            texts = _windows(corpus, recipe.batch_size, recipe.seq_len * 6, rng)
            lm_part = lm_loss(lm, net, pieces, texts, seq_len=recipe.seq_len, negatives=recipe.negatives,
                              bos_row=bos_row, base_in=base_in, base_out=base_out,
                              predict_shared=recipe.predict_shared, gen=gen)
            loss = loss + recipe.lm_weight * lm_part
            parts["lm"] = lm_part.item()
        if recipe.aux_weight > 0 and population.numel():
            pick = population[torch.randint(0, population.numel(), (recipe.aux_tokens,), generator=gen)]
            ids, mask = decompose_without_self(base, pick.tolist(), hcfg.max_pieces)
            aux_part = aux_loss(net, pick, ids, mask, base_in, base_out)
            loss = loss + recipe.aux_weight * aux_part
            parts["aux"] = aux_part.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        state["step"] = step + 1
        for key, value in parts.items():
            running[key] = value if key not in running else 0.9 * running[key] + 0.1 * value
        if state["step"] % recipe.log_every == 0 or state["step"] == 1:
            entry = {"step": state["step"], "seconds": round(time.perf_counter() - started, 1), "vocab": len(pieces.tok),
                     **{k: round(v, 4) for k, v in parts.items()}, **{f"ema_{k}": round(v, 4) for k, v in running.items()}}
            state["history"].append(entry)
            log.info("hypernet %s", entry)
        if state["step"] % recipe.save_every == 0:
            _save_state(out, net, opt, state, rng, gen)
        if recipe.max_minutes and time.perf_counter() - started > 60 * float(recipe.max_minutes):
            log.info("time budget of %s min reached at step %d", recipe.max_minutes, state["step"])
            break
    _save_state(out, net, opt, state, rng, gen)
    save_hypernet(net.eval(), out)
    (out / "history.json").write_text(json.dumps(state["history"], indent=1))
    return out
