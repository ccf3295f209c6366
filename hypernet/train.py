"""Train a hypernetwork for a frozen base LM on randomly sampled tokenizers (ZeTT's recipe), on one CPU
process or many GPUs: the same loop, the recipe decides.

Per tokenizer round (`resample_every` optimizer steps): read the next text block of the streamed corpus
(`hypernet.data`), draw a tokenizer from that block's substring counts (`sampler: batch`, ZeTT) or from one
bounded corpus sample (`sampler: corpus`), and decompose its tokens into base pieces once. Per micro-batch:
cut random windows of the block, tokenize them, predict rows for the batch's tokens (plus negatives) and for
some base tokens (the auxiliary loss) in ONE hypernetwork call, and score them (`hypernet.losses`).

Scale:
- The training stack is the distillation trainer's: processes, device and dtype (`distill.runtime`), the
  frozen LM's loading (`distill.teacher.load_frozen`) and checkpoints (`distill.checkpoint`). DeepSpeed wraps
  the
  hypernetwork: ZeRO 0-2 (`zero_stage`), bf16 on GPUs (`dtype: auto`), gradient accumulation and clipping. The
  frozen base LM is not part of that engine: it is replicated on every process (`lm_shard: none`) or sharded
  by a ZeRO-3 engine of its own (`zero3`, `offload`); its embedding matrices are gathered once (the
  hypernetwork reads base rows by id).
- `<output_dir>/checkpoint/` keeps the newest checkpoint (the trainer state is the step, the tokenizer round,
  the corpus position at that round's start and the log) and next to it a usable `hypernet.safetensors`.
- Data parallel: every process reads the same block and samples the same tokenizer (both are pure functions of
  the seed and the round), then takes its own micro-batches: global micro-batch `a * world + rank` at
  accumulation index `a`, drawn from an RNG keyed by (seed, step, that index). So N processes with
  accumulation k equal one process with accumulation N·k (tests/test_hypernet_scale.py), and resume is exact.
- `max_minutes` is decided by rank 0 and shared, so all processes stop at the same step.
`lm_every: N` runs the (expensive) LM loss only every N-th step; on a CPU the LM forward+backward of a 135M
model costs seconds per step, the auxiliary loss milliseconds.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from distill import checkpoint
from distill.runtime import Runtime, deepspeed_engine, engine_config, peak_memory, start_runtime
from distill.teacher import load_frozen
from hypernet.config import HypernetRecipe
from hypernet.data import CHUNK_BYTES, CorpusStream, corpus_sources, cut_windows, mix_seed
from hypernet.lm import lm_parts
from hypernet.losses import TokenizerPieces, aux_loss, lm_loss, make_lm_batch
from hypernet.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Hypernet,
    HypernetConfig,
    base_stats,
    decompose_without_self,
    save_hypernet,
)
from hypernet.sample import TokenizerSampler, real_tokenizer, substring_counts
from transplant.assets import load_vocab
from transplant.io.atomic import existing_paths, write_marker
from transplant.io.claim import check_claim, claim_output_dir
from transplant.tokenizers.vocab import TokenKind, Vocab

log = logging.getLogger(__name__)
# what a run writes into its output_dir (`transplant.io.claim`): a folder holding anything else is not ours
LAYOUT = ("checkpoint", WEIGHTS_FILE, CONFIG_FILE, "history.json", f"{WEIGHTS_FILE}.tmp",
          f"{CONFIG_FILE}.tmp")


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Checkpoints (`distill.checkpoint`'s format) plus a usable `hypernet.safetensors` + `config.json`."""
    return Path(output_dir) / "checkpoint"


def deepspeed_config(recipe: HypernetRecipe, rt: Runtime) -> dict[str, Any]:
    return engine_config({"zero_optimization": {"stage": recipe.zero_stage},
                          "zero_allow_untested_optimizer": True},
                         micro_batch_size=recipe.batch_size, grad_accum=recipe.grad_accum,
                         world_size=rt.world_size, grad_clip=recipe.grad_clip, dtype=rt.dtype)


def aux_population(base: Vocab) -> list[int]:
    return [i for i, (b, k) in enumerate(zip(base.token_bytes, base.kinds)) if k is TokenKind.NORMAL
            and len(b) >= 2]


def stack_pieces(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-concatenate padded piece matrices of different widths (one hypernetwork call for all of them)."""
    width = max(ids.shape[1] for ids, _ in parts)
    ids = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1])) for i, _ in parts])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in parts])
    return ids, mask


class HypernetTrainer:
    def __init__(self, recipe: HypernetRecipe, runtime: Runtime | None = None):
        self.recipe = recipe
        self.rt = runtime or start_runtime(recipe.device, recipe.dtype, tf32=False)  # matmuls stay full fp32
        self.out = Path(recipe.output_dir)
        self.ckpt = checkpoint_dir(self.out)
        self.step, self.round, self.saved_step = 0, -1, -1
        self.history: list[dict[str, Any]] = []

    def setup(self) -> HypernetTrainer:
        from transplant.assets.catalog import resolve_model

        r, rt = self.recipe, self.rt
        if r.threads:
            torch.set_num_threads(int(r.threads))
        base_dir = resolve_model(r.base)
        # refused before anything loads; claimed (created) only once every input has been read
        check_claim(self.out, kind="hypernet", layout=LAYOUT, protected=self._inputs(base_dir))
        self.base = load_vocab(base_dir)
        self.lm, self.lm_engine = load_frozen(base_dir, r.lm_shard, rt.dtype, rt.device, key="lm_shard",
                                              micro_batch_size=r.batch_size, world_size=rt.world_size)
        self.parts = lm_parts(self.lm)
        dim = self.parts.base_input.shape[1]
        self.config = HypernetConfig(base_dim=dim, base_vocab_size=self.parts.base_input.shape[0],
                                     untied=not self.parts.tied, base_name=str(r.base),
                                     **r.model.architecture(dim))
        torch.manual_seed(r.seed)
        net = Hypernet(self.config, *base_stats(self.parts.base_input, self.parts.base_output))
        opt = torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=r.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, r.warmup)))
        self.engine = deepspeed_engine(net, opt, sched, deepspeed_config(r, rt))
        self.real = [real_tokenizer(load_vocab(spec)) for spec in r.real_tokenizers]
        self._real_pieces: dict[str, TokenizerPieces] = {}
        self.sources = corpus_sources(r.corpus)
        # the first block's start: an empty or binary corpus fails here, before the output folder is claimed
        probe = CorpusStream(self.sources, seed=r.seed)
        probe.read_block(0, min(r.block_bytes, CHUNK_BYTES))
        probe.close()
        self.stream = CorpusStream(self.sources, seed=r.seed)
        self.corpus_sampler = None
        # one bounded sample, read by its own stream (the training position is untouched)
        if r.sampler == "corpus":
            sample = CorpusStream(self.sources, seed=r.seed + 1)
            self.corpus_sampler = self._sampler(self._counts(sample.read_block(0, r.stats_bytes)), 0)
            sample.close()
        self.population = torch.tensor(aux_population(self.base), dtype=torch.long)
        self.bos_id = self.base.roles.get("bos", self.base.roles.get("eos"))
        if rt.is_main:  # every input has been read: now the folder may be claimed
            claim_output_dir(self.out, kind="hypernet", layout=LAYOUT, protected=self._inputs(base_dir))
        params = sum(p.numel() for p in net.parameters())
        log.info("hypernetwork %.2fM parameters for %s (%s, ZeRO-%d, %d process(es), %s, LM shard: %s); "
                 "corpus: %d source(s)", params / 1e6, r.base, rt.dtype, r.zero_stage, rt.world_size,
                 rt.device, r.lm_shard, len(self.sources))
        return self

    def _inputs(self, base_dir: Path) -> list[Path]:
        """What the output folder may neither be, contain nor lie inside: the base, a corpus path, real
        tokenizers given as paths."""
        r = self.recipe
        named = [r.corpus, *r.real_tokenizers] if isinstance(r.corpus, str) else list(r.real_tokenizers)
        return [Path(base_dir), *existing_paths(named)]

    # ------------------------------------------------------------------------------------------ tokenizers
    def _counts(self, pieces: list[str]):
        return substring_counts("".join(pieces), styles=tuple(self.recipe.pretokenizers))

    def _sampler(self, counts, round_index: int) -> TokenizerSampler:
        r = self.recipe
        return TokenizerSampler(counts, size_range=tuple(r.vocab_size), noise=r.noise, real=self.real,
                                real_prob=r.real_prob, seed=mix_seed(r.seed, round_index, 1),
                                styles=tuple(r.pretokenizers))

    def start_round(self, index: int) -> None:
        """Read round `index`'s text block and draw its tokenizer (the same on every process)."""
        r = self.recipe
        self.round, self.round_state = index, self.stream.state_dict()
        self.block = self.stream.read_block(index, r.block_bytes)
        if self.corpus_sampler is not None:
            sampler = self.corpus_sampler
            sampler.rng = random.Random(mix_seed(r.seed, index, 1))
        else:
            sampler = self._sampler(self._counts(self.block), index)
        tok = sampler.sample()
        if any(tok is real for real in self.real):
            if tok.name not in self._real_pieces:
                self._real_pieces[tok.name] = TokenizerPieces(tok, self.base, self.config.max_pieces)
            self.pieces = self._real_pieces[tok.name]
        else:
            self.pieces = TokenizerPieces(tok, self.base, self.config.max_pieces)

    # ------------------------------------------------------------------------------------------ steps
    def micro_step(self, accum_index: int) -> dict[str, float]:
        r, rt, parts = self.recipe, self.rt, self.parts
        micro = accum_index * rt.world_size + rt.rank
        gen = torch.Generator().manual_seed(mix_seed(r.seed, self.step, micro, 2))
        rng = random.Random(mix_seed(r.seed, self.step, micro, 3))
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        batch = None
        if r.lm_weight > 0 and self.step % r.lm_every == 0:
            texts = cut_windows(self.block, r.batch_size, r.seq_len * 6, rng)
            batch = make_lm_batch(self.pieces, texts, r.seq_len, r.negatives, gen)
            if batch is not None:
                chunks.append((self.pieces.ids[batch.subset], self.pieces.mask[batch.subset]))
        pick = None
        if r.aux_weight > 0 and self.population.numel():
            pick = self.population[torch.randint(0, self.population.numel(), (r.aux_tokens,), generator=gen)]
            chunks.append(decompose_without_self(self.base, pick.tolist(), self.config.max_pieces))
        if not chunks:
            return {}
        ids, mask = stack_pieces(chunks)
        rows_in, rows_out = self.engine(ids.to(rt.device), mask.to(rt.device), parts.base_input,
                                        parts.base_output)
        loss = rows_in.new_zeros((), dtype=torch.float32)
        metrics: dict[str, float] = {}
        n_lm = chunks[0][0].shape[0] if batch is not None else 0
        if batch is not None:
            part = lm_loss(parts, self.pieces, batch, rows_in[:n_lm], rows_out[:n_lm], bos_id=self.bos_id,
                           predict_shared=r.predict_shared)
            loss = loss + r.lm_weight * part
            metrics["lm"] = part.item()
            metrics["tokens"] = float(batch.valid.sum())
        if pick is not None:
            part = aux_loss(rows_in[n_lm:], rows_out[n_lm:], pick, parts)
            loss = loss + r.aux_weight * part
            metrics["aux"] = part.item()
        self.engine.backward(loss)
        self.engine.step()
        return metrics

    def train_step(self) -> dict[str, Any]:
        r = self.recipe
        started = time.perf_counter()
        if self.round != self.step // r.resample_every:
            self.start_round(self.step // r.resample_every)
        per_micro = [self.micro_step(a) for a in range(r.grad_accum)]
        keys = ("lm", "aux", "tokens")
        local = torch.tensor([[sum(m.get(k, 0.0) for m in per_micro), sum(k in m for m in per_micro)]
                              for k in keys],
                             dtype=torch.float64, device=self.rt.device)
        if self.rt.world_size > 1:
            torch.distributed.all_reduce(local)
        self.step += 1
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {"step": self.step, "vocab": len(self.pieces.tok)}
        for key, (total, count) in zip(keys, local.tolist()):
            if count and key != "tokens":
                record[key] = round(total / count, 5)
        record["tokens_per_s"] = round(local[2, 0].item() / seconds, 1)
        record["step_seconds"] = round(seconds, 3)
        record["peak_rss_mb"] = peak_memory()["peak_rss_mb"]
        return record

    def _should_stop(self, started: float) -> bool:
        """Rank 0's clock decides and every process follows (unequal stops would hang the next collective)."""
        budget = self.recipe.max_minutes
        stop = torch.tensor([float(bool(budget) and time.perf_counter() - started > 60 * float(budget))],
                            device=self.rt.device)
        if self.rt.world_size > 1:
            torch.distributed.broadcast(stop, src=0)
        return bool(stop.item())

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        self.saved_step = self.step
        state = {"round": self.round, "round_state": self.round_state, "history": self.history}
        tag = checkpoint.save(self.engine, self.ckpt, self.step, state, self.rt.rank, self.rt.world_size)
        if self.rt.is_main:
            save_hypernet(self.engine.module, self.ckpt)
            checkpoint.prune(self.ckpt, 1, tag)

    def resume(self) -> None:
        """`resume: true` continues from the last checkpoint when there is one (a warning says when there is
        none); a broken one is refused (`distill.checkpoint.check_resume`)."""
        tag = checkpoint.check_resume(self.ckpt, True, missing="warn")
        if tag is None:
            return
        self.step, state = checkpoint.load(self.engine, self.ckpt, tag, self.rt.rank)
        self.history = list(state["history"])
        self.stream.load_state_dict(state["round_state"])
        self.start_round(int(state["round"]))

    # ------------------------------------------------------------------------------------------ loop
    def run(self) -> Path:
        r = self.recipe
        if r.resume:
            self.resume()
        started = time.perf_counter()
        ema: dict[str, float] = {}
        bar = tqdm(total=r.steps, initial=self.step, desc="hypernet", disable=not self.rt.is_main,
                   dynamic_ncols=True)
        self.engine.train()
        while self.step < r.steps:
            record = self.train_step()
            for key in ("lm", "aux"):
                if key in record:
                    ema[key] = record[key] if key not in ema else 0.9 * ema[key] + 0.1 * record[key]
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
            if self.step % r.log_every == 0 or self.step == 1:
                record.update({"seconds": round(time.perf_counter() - started, 1),
                               **{f"ema_{k}": round(v, 4) for k, v in ema.items()}})
                self.history.append(record)
                log.info("hypernet %s", record)
            if self.step % r.save_every == 0:
                self.save_checkpoint()
            if self._should_stop(started):
                log.info("time budget of %s min reached at step %d", r.max_minutes, self.step)
                break
        bar.close()
        if self.saved_step != self.step:
            self.save_checkpoint()
        if self.rt.is_main:
            save_hypernet(self.engine.module, self.out)
            (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
            write_marker(self.out, "hypernet", {"base": str(r.base), "steps": self.step})
        if self.rt.world_size > 1:
            torch.distributed.barrier()
        self.stream.close()
        return self.out


def train(recipe: HypernetRecipe) -> Path:
    """Run a recipe (hypernet.config; e.g. recipes/hypernet_smollm2_cpu.yaml); returns the output dir holding
    the hypernetwork."""
    return HypernetTrainer(recipe).setup().run()
