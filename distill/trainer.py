"""Cross-tokenizer distillation on DeepSpeed: frozen teacher, trained student, aligned byte chunks in between.

One loop serves a 2-core CPU smoke run and an 8-GPU ZeRO-3 run; the recipe and its DeepSpeed JSON decide.
Design points:
- The optimizer is a torch object handed to `deepspeed.initialize` (a DS-named optimizer JIT-builds kernels).
- Losses are normalised over the GLOBAL batch: every rank counts its items for all its micro-batches before the
  step, one all-reduce gives the total, and each micro-batch loss is sum(items) / total. DeepSpeed would divide
  by the accumulation steps (disabled: `scale_wrt_gas=False`) and average gradients over ranks (undone by
  multiplying the loss by the world size), so the step equals one big batch on one device.
- "Embeddings only for the first N steps" is a per-group learning-rate factor of 0 for everything else: ZeRO
  flattens parameter groups at start-up, so toggling `requires_grad` later would silently do nothing.
- Every rank evaluates the same held-out text (ZeRO-3 forwards are collectives anyway).
- The trainer names no loss: whether one needs the teacher, which metrics are sums, its options, hidden states
  and per-pair tables are declared where it registers (`distill.losses.registry.LossSpec`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from distill import checkpoint
from distill.config import Recipe
from distill.data import DistillLoader, Packer, read_documents
from distill.export import gather_state_dict, write_hf_dir
from distill.lora import apply_lora
from distill.losses import ANCHOR_LOSS, PairContext, get_loss, loss_options
from distill.runtime import Runtime, init_runtime, load_deepspeed_config, resolve_dtype, zero_stage
from transplant.errors import TransplantError

log = logging.getLogger(__name__)

ANCHOR_METRIC = "ce_anchor"  # the `loss.ce_weight` term, a sum over items like the loss itself


def lr_factor(step: int, optim: Any, total: int) -> float:
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min((step - optim.warmup_steps) / max(total - optim.warmup_steps, 1), 1.0)
    floor = optim.min_lr_ratio
    if optim.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    if optim.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise TransplantError(f"optim.schedule={optim.schedule!r} is unknown; use cosine, linear or constant")


def embedding_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not params[0]:
        params.append(output.weight)
    return params


def resolve_model_dir(spec: str) -> Path:
    from transplant.assets.sources import resolve_source

    return Path(resolve_source(spec, need_model=True).model_dir)


def prepare_student(recipe: Recipe, is_main: bool, timeout_s: float = 3600.0) -> None:
    """Create the student with `transplant` when its dir is missing and the recipe says how (rank 0 builds it,
    the others wait for the atomic rename)."""
    path, prep = Path(recipe.student.path), recipe.student.prepare
    if path.exists() or prep is None or not prep.base:
        return
    if is_main:
        from transplant.pipeline import transplant

        log.info("student %s missing: transplant(%s, %s, method=%s)", path, prep.base, prep.donor, prep.method)
        transplant(prep.base, prep.donor, method=prep.method, output=path, options=dict(prep.options))
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TransplantError(f"student {path} did not appear; run the transplant command in the recipe")
        time.sleep(2)


class Trainer:
    def __init__(self, recipe: Recipe, runtime: Runtime | None = None):
        self.recipe = recipe
        self.rt = runtime or init_runtime(recipe)
        self.out = Path(recipe.output_dir)
        self.ckpt_dir = Path(recipe.checkpoint.dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self.step = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        import deepspeed
        from transformers import AutoModelForCausalLM

        from transplant.assets import load_vocab

        r, rt = self.recipe, self.rt
        prepare_student(r, rt.is_main)
        self.teacher_dir, self.student_dir = resolve_model_dir(r.teacher.path), resolve_model_dir(r.student.path)
        self.teacher_vocab = load_vocab(self.teacher_dir, trust_remote_code=r.teacher.trust_remote_code)
        self.student_vocab = load_vocab(self.student_dir, trust_remote_code=r.student.trust_remote_code)
        self.anchor = get_loss(ANCHOR_LOSS)
        self.use_loss(r.loss.name)
        self.ds_config = load_deepspeed_config(r, rt)
        self.stage = zero_stage(self.ds_config)
        torch.manual_seed(r.train.seed)

        self.teacher = None
        if self.loss.needs_teacher or r.eval.teacher:
            teacher_dtype = resolve_dtype(r.teacher.dtype, rt.device)
            self.teacher = AutoModelForCausalLM.from_pretrained(
                self.teacher_dir, dtype=teacher_dtype, trust_remote_code=r.teacher.trust_remote_code).to(rt.device)
            self.teacher.eval().requires_grad_(False)
        if self.stage == 3:  # from here on from_pretrained partitions weights as it loads (zero.Init)
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        student = AutoModelForCausalLM.from_pretrained(self.student_dir, dtype=rt.dtype,
                                                       trust_remote_code=r.student.trust_remote_code)
        student.config.use_cache = False
        _check_vocab(self.student_vocab, student.config, "student", self.student_dir)
        if self.teacher is not None:
            _check_vocab(self.teacher_vocab, self.teacher.config, "teacher", self.teacher_dir)
        if r.train.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        if r.lora.enabled:
            apply_lora(student, rank=r.lora.rank, alpha=r.lora.alpha, dropout=r.lora.dropout, targets=r.lora.targets)
            if r.lora.train_embeddings:
                for param in embedding_params(student):
                    param.requires_grad_(True)
        optimizer, scheduler = self._optimizer(student)
        self.engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.ds_config)

        docs = read_documents(r.data.train, corpus_bytes=r.data.train_bytes)
        packer = Packer(docs, self.teacher_vocab, self.student_vocab, max_length=r.data.max_length,
                        seed=r.train.seed, shuffle=r.data.shuffle, pack=r.data.pack, chat_template=r.data.chat_template)
        self.loader = DistillLoader(packer, micro_batch_size=r.train.micro_batch_size, grad_accum=r.train.grad_accum,
                                    rank=rt.rank, world_size=rt.world_size, prefetch=r.data.prefetch)
        self.heldout = self._heldout_texts()
        log.info("teacher %s, student %s (%s, ZeRO-%d, %d rank(s)), loss %s, %d documents",
                 self.teacher_dir, self.student_dir, rt.dtype, self.stage, rt.world_size, r.loss.name, len(docs))
        return self

    def _optimizer(self, model: torch.nn.Module):
        r = self.recipe
        embeddings = [p for p in embedding_params(model) if p.requires_grad]
        emb_ids = {id(p) for p in embeddings}
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in emb_ids]
        groups, lambdas = [], []
        total, warm_emb = r.train.steps, r.train.embeddings_only_steps
        if warm_emb and not embeddings:
            raise TransplantError("train.embeddings_only_steps > 0 but no embedding is trainable; "
                                  "set lora.train_embeddings=true or embeddings_only_steps=0")
        if embeddings:
            groups.append({"params": embeddings, "lr": r.optim.embedding_lr or r.optim.lr, "name": "embeddings"})
            lambdas.append(lambda s: lr_factor(s, r.optim, total))
        if body:
            groups.append({"params": body, "lr": r.optim.lr, "name": "body"})
            lambdas.append(lambda s: 0.0 if s < warm_emb else lr_factor(s, r.optim, total))
        if not groups:
            raise TransplantError("nothing to train: every parameter is frozen; check the lora settings")
        self.group_names = [g["name"] for g in groups]
        optimizer = torch.optim.AdamW(groups, lr=r.optim.lr, betas=tuple(r.optim.betas), eps=r.optim.eps,
                                      weight_decay=r.optim.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    def use_loss(self, name: str) -> None:
        """Train with registered loss `name` from the next step on: its checked options and its per-pair extras
        (`LossSpec.prepare`, built here once). Setup calls it; a bench may switch losses between steps."""
        self.loss = get_loss(name)
        self.loss_options = loss_options(name, self.recipe.loss.options)
        extras = self.loss.prepare(PairContext(self.student_vocab, self.teacher_vocab, self.loss_options))
        self.loss_extras = {k: v.to(self.rt.device) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}

    def _heldout_texts(self) -> dict[str, str]:
        texts = {}
        for spec in self.recipe.eval.texts:
            spec = str(spec)
            if spec.startswith("texts:"):
                from transplant.assets import texts as corpora

                texts[spec[6:]] = corpora.heldout(spec[6:], self.recipe.eval.n_bytes)
            else:
                path = Path(spec)
                if not path.is_file():
                    raise TransplantError(f"eval text {spec} does not exist; give a file or texts:NAME")
                texts[path.stem] = path.read_text(encoding="utf-8")
        return texts

    # ------------------------------------------------------------------------------------------------ steps
    def _counts(self, batches: list) -> torch.Tensor:
        """Global item counts [main loss, anchor] over all micro-batches of all ranks."""
        local = [sum(self.loss.count_items({"alignment": b}) for b in batches),
                 sum(self.anchor.count_items({"alignment": b}) for b in batches) if self.recipe.loss.ce_weight else 0]
        counts = torch.tensor(local, dtype=torch.float64, device=self.rt.device)  # NCCL reduces device tensors
        if self.rt.world_size > 1:
            torch.distributed.all_reduce(counts)
        return counts.cpu().clamp(min=1)

    def _micro_step(self, alignment, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        r, a = self.recipe, alignment.to(self.rt.device)
        need_hidden = self.loss.needs_hidden(self.loss_options)
        batch: dict[str, Any] = {"alignment": a, **self.loss_extras}
        if self.loss.needs_teacher:
            with torch.no_grad():
                t_out = self.teacher(input_ids=a.teacher_input_ids, attention_mask=a.teacher_attention_mask,
                                     output_hidden_states=need_hidden)
            batch["teacher_logits"] = t_out.logits
            if need_hidden:
                batch["teacher_hidden_states"] = t_out.hidden_states[-1]
        s_out = self.engine(input_ids=a.student_input_ids, attention_mask=a.student_attention_mask,
                            output_hidden_states=need_hidden)
        batch["student_logits"] = s_out.logits
        if need_hidden:
            batch["student_hidden_states"] = s_out.hidden_states[-1]
        loss, metrics = self.loss(batch, num_items=float(counts[0]), **self.loss_options)
        if r.loss.ce_weight:
            anchor, _ = self.anchor(batch, num_items=float(counts[1]))
            loss = loss + r.loss.ce_weight * anchor
            metrics = {**metrics, ANCHOR_METRIC: anchor.detach(), "loss": loss.detach()}
        self.engine.backward(loss * self.rt.world_size, scale_wrt_gas=False)
        self.engine.step()
        return {k: v.detach().float() for k, v in metrics.items()}  # stays on the device: one sync per step

    def train_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        lrs = [g["lr"] for g in self.engine.optimizer.param_groups]  # the rates this step uses
        batches = self.loader.step_batches()
        counts = self._counts(batches)
        per_micro = [self._micro_step(b, counts) for b in batches]
        keys, summed = sorted(per_micro[0]), self.loss.sum_metrics | {ANCHOR_METRIC}
        local = torch.stack([torch.stack([m[k] for m in per_micro]).sum() if k in summed
                             else torch.stack([m[k] for m in per_micro]).mean() for k in keys])
        tokens = torch.tensor([float(sum(int(b.student_attention_mask.sum()) for b in batches))], device=local.device)
        packed = torch.cat([local, tokens])
        if self.rt.world_size > 1:
            torch.distributed.all_reduce(packed)
        values = dict(zip(keys, packed[:-1].tolist()))
        for key in keys:
            if key not in summed:
                values[key] /= self.rt.world_size
        self.step += 1
        seconds = time.perf_counter() - started
        record = {"step": self.step, **values, "num_items": float(counts[0]), "step_time": seconds,
                  "student_tokens_per_s": float(packed[-1]) / seconds, **_peak_memory(),
                  **{f"lr_{name}": lr for name, lr in zip(self.group_names, lrs)}}
        return record

    # ------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None, tokenizer: Any = None) -> dict[str, float]:
        from transplant.eval.bpb import bits_per_byte

        if not self.heldout:
            return {}
        model = model or self.engine.module
        tokenizer = tokenizer or self.student_vocab.tokenizer
        was_training = model.training
        model.eval()
        results, nbytes = {}, {}
        for name, text in self.heldout.items():
            results[name] = bits_per_byte(model, tokenizer, text, max_length=self.recipe.eval.max_length)
            nbytes[name] = len(text.encode("utf-8"))
        model.train(was_training)
        results["all"] = sum(results[n] * nbytes[n] for n in nbytes) / max(sum(nbytes.values()), 1)
        return results

    # ------------------------------------------------------------------------------------------------ loop
    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.rt.is_main:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _start(self) -> None:
        r = self.recipe
        if self.rt.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(r.to_dict(), sort_keys=False))
        found = checkpoint.latest_tag(self.ckpt_dir) if self.ckpt_dir.exists() else None
        if found and not r.train.resume:
            raise TransplantError(f"{self.ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue "
                                  "it, or choose another output_dir")
        restored = checkpoint.load(self.engine, self.ckpt_dir, self.rt.rank) if r.train.resume else None
        if restored:
            self.step, loader_state = restored
            self.loader.load_state_dict(loader_state)
            if self.rt.is_main and self.metrics_path.exists():  # drop records the killed run wrote after it
                kept = [line for line in self.metrics_path.read_text().splitlines()
                        if line and json.loads(line).get("step", 0) <= self.step]
                self.metrics_path.write_text("".join(line + "\n" for line in kept))
        elif self.rt.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()
        if not restored and r.eval.at_start and self.heldout:
            record: dict[str, Any] = {"step": 0, **{f"eval_bpb_{k}": v for k, v in self.evaluate().items()}}
            if r.eval.teacher and self.teacher is not None:
                teacher_bpb = self.evaluate(self.teacher, self.teacher_vocab.tokenizer)
                record.update({f"teacher_bpb_{k}": v for k, v in teacher_bpb.items()})
            self._log(record)
            log.info("step 0: held-out BPB %s", _fmt(record))

    def train(self) -> dict[str, Any]:
        r = self.recipe
        self._start()
        total = r.train.steps
        bar = tqdm(total=total, initial=self.step, desc="distill", disable=not self.rt.is_main, dynamic_ncols=True)
        while self.step < total:
            record = self.train_step()
            if r.eval.every and self.step % r.eval.every == 0 and self.step < total:
                record.update({f"eval_bpb_{k}": v for k, v in self.evaluate().items()})
            if self.step == total and self.heldout:
                record.update({f"eval_bpb_{k}": v for k, v in self.evaluate().items()})
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", s=f"{record['step_time']:.2f}")
            if self.step % max(r.train.log_every, 1) == 0:
                log.info("step %d: %s", self.step, _fmt(record))
            if r.checkpoint.every and self.step % r.checkpoint.every == 0:
                self.save_checkpoint()
            if r.train.stop_after and self.step >= r.train.stop_after and self.step < total:
                log.info("stopping after step %d (train.stop_after); continue with --resume", self.step)
                bar.close()
                return {"steps": self.step, "history": self.history, "export": None}
        bar.close()
        exported = self.export() if r.export.enabled else None
        return {"steps": self.step, "history": self.history, "export": exported}

    def save_checkpoint(self) -> None:
        checkpoint.save(self.engine, self.ckpt_dir, self.step, self.loader.state_dict(), self.rt.rank)
        if self.rt.world_size > 1:
            torch.distributed.barrier()
        if self.rt.is_main:
            checkpoint.prune(self.ckpt_dir, self.recipe.checkpoint.keep)

    def export(self) -> Path | None:
        state = gather_state_dict(self.engine, self.stage, self.rt.is_main)
        out = None
        if self.rt.is_main:
            dtype = resolve_dtype(self.recipe.export.dtype, self.rt.device) if self.recipe.export.dtype != "auto" \
                else self.rt.dtype
            out = write_hf_dir(self.engine.module, state, self.student_dir, Path(self.recipe.export.dir), dtype)
        if self.rt.world_size > 1:
            torch.distributed.barrier()
        return out


def _check_vocab(vocab: Any, config: Any, role: str, directory: Path) -> None:
    """Token ids beyond the embedding rows would crash mid-run (or read garbage on GPU): fail at start-up."""
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if rows is not None and len(vocab) > rows:
        raise TransplantError(f"{role} {directory}: its tokenizer has {len(vocab)} ids but the model only "
                              f"{rows} embedding rows; use the tokenizer saved with that model")


def _peak_memory() -> dict[str, float]:
    import resource

    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if torch.cuda.is_available():
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def _fmt(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "step")


def run(recipe: Recipe) -> dict[str, Any]:
    """Set up and train; the entry point for `distill` (distill.main) and the tests."""
    return Trainer(recipe).setup().train()
