"""Cross-tokenizer distillation on DeepSpeed: frozen teacher, trained student, aligned byte chunks in between.

One loop serves a 2-core CPU smoke run and an 8-GPU ZeRO-3 run; the recipe and its DeepSpeed JSON decide.
Design points:
- The optimizer is built by `distill.optim` and handed to `deepspeed.initialize` (torch AdamW, fused on CUDA;
  DeepSpeed's CPU Adam when the config offloads the optimizer); a DeepSpeed `optimizer` section is refused.
- Losses are normalised over the GLOBAL batch: every rank counts its items for all its micro-batches before
  the step, one all-reduce gives the total, and each micro-batch loss is sum(items) / total. DeepSpeed would
  divide by the accumulation steps (disabled: `scale_wrt_gas=False`) and average gradients over ranks (undone
  by multiplying the loss by the world size), so the step equals one big batch on one device.
- "Embeddings only for the first N steps" is a per-group learning-rate factor of 0 for everything else, then
  the body warms up again (`distill.optim`).
- The teacher is replicated or sharded with ZeRO-3 (`distill.teacher`, recipe `teacher.shard`). Trainable
  modules a loss declares (ALM's hidden-state projection) are attached to the student under `LOSS_MODULES`, so
  ZeRO trains, shards and checkpoints them; the export drops them.
- Under `train.autocast` the forwards run in bf16/fp16 on fp32 weights (DeepSpeed torch_autocast for the
  student, torch.autocast for the teacher); the losses upcast logits to fp32 either way.
- Every rank evaluates the same held-out text (ZeRO-3 forwards are collectives anyway).
- The trainer names no loss: whether one needs the teacher, which metrics are sums, its options, hidden states
  and per-pair tables are declared where it registers (`distill.losses.registry.LossSpec`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from distill import checkpoint
from distill.agreement import heldout_alignment, teacher_agreement
from distill.config import Recipe
from distill.corpus import heldout_texts, open_corpus
from distill.data import DistillLoader, Packer, shared_window_index
from distill.export import check_export_dir, claim_terms, gather_state_dict, write_hf_dir
from distill.losses import ANCHOR_LOSS, PairContext, get_loss, loss_options
from distill.losses.balance import BALANCES, balanced_step, block_probe
from distill.optim import build_optimizer, lr_factor, param_groups
from distill.runtime import (
    Runtime,
    autocast_dtype,
    deepspeed_engine,
    format_record,
    init_runtime,
    launch_environment,
    load_deepspeed_config,
    peak_memory,
    resolve_dtype,
    zero_stage,
)
from distill.student import check_vocab, embedding_params, load_student, prepare_student, resolve_model_dir
from distill.teacher import load_frozen
from transplant.errors import TransplantError
from transplant.io.claim import check_claim, claim_output_dir

log = logging.getLogger(__name__)

ANCHOR_METRIC = "ce_anchor"  # the `loss.ce_weight` term, a sum over items like the loss itself
LOSS_MODULES = "distill_loss_modules"  # where a loss's trainable modules hang on the student (not exported)
__all__ = ["LOSS_MODULES", "Trainer", "lr_factor", "prepare_student", "run"]


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
        from transplant.assets import load_vocab

        r, rt = self.recipe, self.rt
        prepare_student(r, rt.is_main)
        self.teacher_dir, self.student_dir = (resolve_model_dir(r.teacher.path),
                                              resolve_model_dir(r.student.path))
        self.teacher_vocab = load_vocab(self.teacher_dir, trust_remote_code=r.teacher.trust_remote_code)
        self.student_vocab = load_vocab(self.student_dir, trust_remote_code=r.student.trust_remote_code)
        self.anchor = get_loss(ANCHOR_LOSS)
        self.use_loss(r.loss.name)
        self.ds_config = load_deepspeed_config(r, rt)
        self.stage = zero_stage(self.ds_config)
        torch.manual_seed(r.train.seed)

        self.teacher, self.teacher_engine = None, None
        if r.student.shard != "none":
            raise TransplantError("student.shard is for the teacher; the student is sharded by its DeepSpeed "
                                  "config")
        if self.loss.needs_teacher or r.eval.teacher:
            self.teacher, self.teacher_engine = load_frozen(
                self.teacher_dir, r.teacher.shard, resolve_dtype(r.teacher.dtype, rt.device), rt.device,
                trust_remote_code=r.teacher.trust_remote_code, micro_batch_size=r.train.micro_batch_size,
                world_size=rt.world_size)
        if self.stage == 3:  # from here on from_pretrained partitions weights as it loads (zero.Init)
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        student = load_student(r, self.student_dir, self.student_vocab, rt.dtype)
        if self.teacher is not None:
            check_vocab(self.teacher_vocab, self.teacher.config, "teacher", self.teacher_dir)
        self._attach_loss_modules(student)
        optimizer, scheduler = self._optimizer(student)
        self.engine = deepspeed_engine(student, optimizer, scheduler, self.ds_config)
        self.probe = block_probe(self.engine.module, r.loss.gradmag_at, self.stage,
                                 bool(self.ce_weight) and self.balance == "gradmag")

        corpus = open_corpus(r.data.train, corpus_bytes=r.data.train_bytes)
        if rt.is_main:  # every input has been read and checked: now the output may be claimed and written
            if r.export.enabled:  # a bad export dir fails now, not after hours of training
                check_export_dir(Path(r.export.dir), protected=[self.student_dir, self.teacher_dir])
            claim_output_dir(self.out, **claim_terms(r, [self.teacher_dir, self.student_dir]))
        packer = Packer(corpus, self.teacher_vocab, self.student_vocab, max_length=r.data.max_length,
                        seed=r.train.seed, shuffle=r.data.shuffle, pack=r.data.pack,
                        chat_template=r.data.chat_template, stratify=r.data.stratify)
        self.loader = DistillLoader(packer, micro_batch_size=r.train.micro_batch_size,
                                    grad_accum=r.train.grad_accum, rank=rt.rank, world_size=rt.world_size,
                                    prefetch=r.data.prefetch, index=self._window_index(packer))
        self.heldout = heldout_texts(r.eval.texts, r.eval.n_bytes)
        self.agreement = {}
        # aligned once; the teacher's side kept after the first
        if r.eval.agreement and self.teacher is not None:
            self.agreement = {name: heldout_alignment(text, self.teacher_vocab, self.student_vocab,
                                                      r.data.max_length)
                              for name, text in self.heldout.items()}
        log.info("teacher %s (%s), student %s (%s, ZeRO-%d, %d rank(s)), loss %s, %d documents",
                 self.teacher_dir, r.teacher.shard, self.student_dir, rt.dtype, self.stage, rt.world_size,
                 r.loss.name, len(corpus))
        return self

    def _attach_loss_modules(self, student: torch.nn.Module) -> None:
        """The loss's trainable modules (`LossSpec.modules`), as a submodule of the student."""
        text = student.config.get_text_config()
        teacher_size = self.teacher.config.get_text_config().hidden_size if self.teacher is not None else None
        ctx = PairContext(self.student_vocab, self.teacher_vocab, self.loss_options,
                          getattr(text, "hidden_size", None), teacher_size)
        modules = self.loss.modules(ctx)
        if modules:
            student.add_module(LOSS_MODULES, torch.nn.ModuleDict(modules).to(self.rt.dtype))

    def _optimizer(self, model: torch.nn.Module):
        embeddings = [p for p in embedding_params(model) if p.requires_grad]
        owned = getattr(model, LOSS_MODULES, None)
        loss_params = [p for p in owned.parameters() if p.requires_grad] if owned is not None else []
        skip = {id(p) for p in embeddings + loss_params}
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
        groups, lambdas = param_groups(embeddings, body, loss_params, self.recipe)
        self.group_names = [g["name"] for g in groups]
        optimizer = build_optimizer(groups, self.recipe, self.ds_config, self.rt.device)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    def _window_index(self, packer: Packer):
        """With several ranks (or `data.window_index: always`), the one-off record of where each window of the
        run starts (`distill.data.WindowIndex`), so each rank tokenizes only its own windows."""
        r, rt = self.recipe, self.rt
        mode = r.data.window_index
        if mode not in ("auto", "always", "never"):
            raise TransplantError(f"data.window_index={mode!r} is unknown; use auto, always or never")
        if mode == "never" or (mode == "auto" and rt.world_size == 1):
            return None
        key = json.dumps({"data": vars(r.data), "seed": r.train.seed, "teacher": str(self.teacher_dir),
                          "student": str(self.student_dir),
                          "sizes": [len(self.teacher_vocab), len(self.student_vocab)]},
                         sort_keys=True, default=str)
        windows = r.train.steps * r.train.micro_batch_size * r.train.grad_accum * rt.world_size
        barrier = torch.distributed.barrier if rt.world_size > 1 else (lambda: None)
        return shared_window_index(packer, windows, self.out / "window_index.json",
                                   hashlib.sha256(key.encode()).hexdigest(), rt.is_main, barrier)

    def use_loss(self, name: str) -> None:
        """Train with registered loss `name` from the next step on: its checked options, its per-pair extras
        (`LossSpec.prepare`, built here once) and its CE weight. Setup calls it; a bench may switch losses
        between steps (trainable loss modules are built once, at setup, for the recipe's loss)."""
        self.loss = get_loss(name)
        self.loss_options = loss_options(name, self.recipe.loss.options)
        weight, balance = self.recipe.loss.ce_weight, self.recipe.loss.balance
        # the published weight by default
        self.ce_weight = self.loss.ce_weight if weight is None else float(weight)
        self.balance = self.loss.balance if balance is None else balance
        if self.balance not in BALANCES:
            raise TransplantError(f"loss.balance={self.balance!r} is unknown; use one of "
                                  f"{', '.join(BALANCES)}")
        extras = self.loss.prepare(PairContext(self.student_vocab, self.teacher_vocab, self.loss_options))
        self.loss_extras = {k: v.to(self.rt.device) if isinstance(v, torch.Tensor) else v
                            for k, v in extras.items()}

    # ------------------------------------------------------------------------------------------------ steps
    def _counts(self, batches: list) -> torch.Tensor:
        """Global item counts [main loss, anchor] over all micro-batches of all ranks."""
        local = [sum(self.loss.count_items({"alignment": b}) for b in batches),
                 sum(self.anchor.count_items({"alignment": b}) for b in batches) if self.ce_weight else 0]
        # NCCL reduces device tensors
        counts = torch.tensor(local, dtype=torch.float64, device=self.rt.device)
        if self.rt.world_size > 1:
            torch.distributed.all_reduce(counts)
        return counts.cpu().clamp(min=1)

    def _micro_step(self, alignment, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        a = alignment.to(self.rt.device)
        balance = bool(self.ce_weight) and self.balance == "gradmag"
        need_hidden = self.loss.needs_hidden(self.loss_options)
        batch: dict[str, Any] = {"alignment": a, **self.loss_extras}
        owned = getattr(self.engine.module, LOSS_MODULES, None)
        if owned is not None:
            batch.update(owned.items())
        if self.loss.needs_teacher:
            with torch.no_grad(), self._teacher_autocast():
                t_out = self.teacher(input_ids=a.teacher_input_ids, attention_mask=a.teacher_attention_mask,
                                     output_hidden_states=need_hidden)
            batch["teacher_logits"] = t_out.logits
            if need_hidden:
                batch["teacher_hidden_states"] = t_out.hidden_states[-1]
        s_out = self.engine(input_ids=a.student_input_ids, attention_mask=a.student_attention_mask,
                            output_hidden_states=need_hidden)
        outputs = {"student_logits": s_out.logits}
        if need_hidden:
            outputs["student_hidden_states"] = s_out.hidden_states[-1]
        batch.update(outputs)
        # GradMag probes each loss's gradient at a detached copy of the logits (see balanced_step)
        if balance:
            batch["student_logits"] = s_out.logits.detach().requires_grad_()
        loss, metrics = self.loss(batch, num_items=float(counts[0]), **self.loss_options)
        if self.ce_weight:
            anchor, _ = self.anchor(batch, num_items=float(counts[1]))
            if balance:  # the weights come from the gradients; ce_weight only switches the CE term on
                loss, value, weights = balanced_step([loss, anchor], [batch["student_logits"]],
                                                     [s_out.logits],
                                                     through_losses=need_hidden or owned is not None,
                                                     norms_from=None if self.probe is None
                                                     else self.probe.norm_function(s_out.logits))
                metrics = {**metrics, "ce_share": weights[1], ANCHOR_METRIC: anchor.detach(), "loss": value}
            else:
                loss = loss + self.ce_weight * anchor
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
        tokens = torch.tensor([float(sum(int(b.student_attention_mask.sum()) for b in batches))],
                              device=local.device)
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
                  "student_tokens_per_s": float(packed[-1]) / seconds, **peak_memory(),
                  **{f"lr_{name}": lr for name, lr in zip(self.group_names, lrs)}}
        return record

    def _teacher_autocast(self):
        dtype = autocast_dtype(self.recipe)
        return (torch.autocast(self.rt.device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())

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

    def _eval_record(self) -> dict[str, float]:
        """The student's held-out BPB per slice and, with a teacher, its disagreement with the teacher
        (`distill.agreement`: bits/byte, lower = closer to the teacher)."""
        record = {f"eval_bpb_{k}": v for k, v in self.evaluate().items()}
        if self.agreement:
            model = self.engine.module
            was_training = model.training
            model.eval()
            record.update({f"eval_disagree_{k}": v
                           for k, v in teacher_agreement(model, self.teacher, self.agreement).items()})
            model.train(was_training)
        return record

    # ------------------------------------------------------------------------------------------------ loop
    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.rt.is_main:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _start(self) -> None:
        r = self.recipe
        tag = checkpoint.check_resume(self.ckpt_dir, r.train.resume)
        if self.rt.is_main:  # written once the output and resume checks have passed
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(r.to_dict(), sort_keys=False))
        restored = checkpoint.load(self.engine, self.ckpt_dir, tag, self.rt.rank) if tag else None
        if restored:
            self.step, state = restored
            self.loader.load_state_dict(state["loader"])
            if self.rt.is_main and self.metrics_path.exists():  # drop records the killed run wrote after it
                kept = [line for line in self.metrics_path.read_text().splitlines()
                        if line and json.loads(line).get("step", 0) <= self.step]
                self.metrics_path.write_text("".join(line + "\n" for line in kept))
        elif self.rt.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()
        if not restored and r.eval.at_start and self.heldout:
            record: dict[str, Any] = {"step": 0, **self._eval_record()}
            if r.eval.teacher and self.teacher is not None:
                teacher_bpb = self.evaluate(self.teacher, self.teacher_vocab.tokenizer)
                record.update({f"teacher_bpb_{k}": v for k, v in teacher_bpb.items()})
            self._log(record)
            log.info("step 0: held-out BPB %s", format_record(record))

    def train(self) -> dict[str, Any]:
        r = self.recipe
        self._start()
        total = r.train.steps
        bar = tqdm(total=total, initial=self.step, desc="distill", disable=not self.rt.is_main,
                   dynamic_ncols=True)
        while self.step < total:
            record = self.train_step()
            if r.eval.every and self.step % r.eval.every == 0 and self.step < total:
                record.update(self._eval_record())
            if self.step == total and self.heldout:
                record.update(self._eval_record())
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", s=f"{record['step_time']:.2f}")
            if self.step % max(r.train.log_every, 1) == 0:
                log.info("step %d: %s", self.step, format_record(record))
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
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, {"loader": self.loader.state_dict()},
                              self.rt.rank, self.rt.world_size)
        if self.rt.is_main:
            checkpoint.prune(self.ckpt_dir, self.recipe.checkpoint.keep, tag)

    def export(self) -> Path | None:
        state = gather_state_dict(self.engine, self.stage, self.rt.is_main)
        if state is not None:  # a loss's own modules (ALM's projection) are training machinery, not the model
            state = {k: v for k, v in state.items() if not k.startswith(f"{LOSS_MODULES}.")}
        out = None
        if self.rt.is_main:
            dtype = resolve_dtype(self.recipe.export.dtype,
                                  self.rt.device) if self.recipe.export.dtype != "auto" \
                else self.rt.dtype
            out = write_hf_dir(self.engine.module, state, self.student_dir,
                               Path(self.recipe.export.dir), dtype)
        if self.rt.world_size > 1:
            torch.distributed.barrier()
        return out


def run(recipe: Recipe, resume: bool | None = None) -> dict[str, Any]:
    """Set up and train (the `distill` command's function): `resume` overrides `train.resume`. Checkpoints are
    checked first, so a `--resume` with nothing (or something broken) to resume from fails before any model
    loads. Returns {"steps", "history", "export"}."""
    if resume is not None:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, resume=resume))
    check_claim(recipe.output_dir, **claim_terms(recipe, [recipe.teacher.path, recipe.student.path]))
    checkpoint.check_resume(Path(recipe.checkpoint.dir), recipe.train.resume)
    with launch_environment():  # a subprocess started after the run must not inherit its RANK/MASTER_PORT
        return Trainer(recipe).setup().train()
