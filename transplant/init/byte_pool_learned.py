"""`byte-pool-learned`: a small Byte2Word-style pooler that maps a token's bytes to its embedding.

A learned 256×d byte table plus positions feeds a cross-attention block whose learned queries read the bytes;
an MLP maps the pooled vector to the base embedding space. It is fitted by regression (normalised MSE +
cosine) to reproduce the base model's own rows for its base vocabulary, then applied to the new tokens: the
base vocabulary is the supervision, no donor and no text needed. Shared tokens are copied (sparse part of the
plan).

The fitted pooler is cached per base (hash of the base's token bytes, its embeddings and the hyper-parameters)
under `<cache>/byte_pool/<hash>.safetensors`, so the ~1-3 minute CPU fit happens once per base model.
Options: `steps` (default 1500), `dim` (128), `max_bytes` (16), `lr` (3e-3), `cache` (true), `seed` (0).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from transplant.init.base import InitContext, InitPlan, copy_shared, normal_base_ids, row_mean, sparse_rows
from transplant.init.registry import Option, register
from transplant.tokenizers.vocab import TokenKind, Vocab

log = logging.getLogger(__name__)
PAD = 256


class BytePooler(nn.Module):
    def __init__(self, out_dim: int, dim: int = 128, max_bytes: int = 16, queries: int = 4, heads: int = 4,
                 outputs: int = 1):
        super().__init__()
        self.max_bytes = max_bytes
        self.bytes = nn.Embedding(257, dim, padding_idx=PAD)
        self.positions = nn.Embedding(max_bytes, dim)
        self.mix = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                              norm_first=True)
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.attend = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim * queries)
        self.head = nn.Sequential(nn.Linear(dim * queries, 2 * dim), nn.GELU(),
                                  nn.Linear(2 * dim, out_dim * outputs))
        self.register_buffer("mean", torch.zeros(out_dim * outputs))
        self.register_buffer("std", torch.ones(()))

    def forward(self, byte_ids: torch.Tensor) -> torch.Tensor:
        mask = byte_ids != PAD
        x = self.bytes(byte_ids) + self.positions(torch.arange(byte_ids.shape[1], device=byte_ids.device))
        x = self.mix(x, src_key_padding_mask=~mask)
        q = self.queries.expand(byte_ids.shape[0], -1, -1)
        pooled, _ = self.attend(q, x, x, key_padding_mask=~mask)
        return self.mean + self.std * self.head(self.norm(pooled.flatten(1)))


def byte_matrix(pieces: list[bytes], max_bytes: int) -> torch.Tensor:
    """[N, L] byte ids padded with PAD; long tokens keep their first max_bytes bytes."""
    width = max(1, min(max_bytes, max((len(p) for p in pieces), default=1)))
    out = torch.full((len(pieces), width), PAD, dtype=torch.long)
    for row, piece in enumerate(pieces):
        data = piece[:max_bytes]
        if data:
            out[row, : len(data)] = torch.tensor(list(data))
    return out


def _targets(base_input: torch.Tensor, base_output: torch.Tensor | None) -> torch.Tensor:
    return (base_input.float() if base_output is None
            else torch.cat([base_input.float(), base_output.float()], 1))


def _loss(pred: torch.Tensor, target: torch.Tensor, dim: int) -> torch.Tensor:
    total = torch.zeros(())
    for part in range(target.shape[1] // dim):  # input and output spaces each scored on their own scale
        p, t = pred[:, part * dim : (part + 1) * dim], target[:, part * dim : (part + 1) * dim]
        total = (total + (p - t).pow(2).mean() / t.var().clamp_min(1e-8)
                 + (1 - F.cosine_similarity(p, t, -1)).mean())
    return total


def fit_pooler(base: Vocab, base_input: torch.Tensor, base_output: torch.Tensor | None, *, steps: int = 1500,
               dim: int = 128, max_bytes: int = 16, lr: float = 3e-3, batch: int = 256, seed: int = 0,
               holdout: float = 0.05) -> tuple[BytePooler, dict[str, float]]:
    """Regress the base's rows from their bytes; returns the pooler and held-out error before/after
    fitting."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ids = [i for i, k in enumerate(base.kinds) if k is not TokenKind.SPECIAL and base.token_bytes[i]]
    ids_t = torch.tensor(ids)[torch.randperm(len(ids), generator=gen)]
    n_hold = max(1, int(len(ids) * holdout))
    hold, train_ids = ids_t[:n_hold], ids_t[n_hold:]
    targets = _targets(base_input, base_output)
    bytes_all = byte_matrix([base.token_bytes[i] for i in range(len(base))], max_bytes)
    d = base_input.shape[1]
    pooler = BytePooler(d, dim, max_bytes, outputs=targets.shape[1] // d)
    pooler.mean.copy_(targets[train_ids].mean(0))
    pooler.std.fill_(float(targets[train_ids].std()))
    opt = torch.optim.AdamW(pooler.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)

    def held_out_error() -> float:
        with torch.no_grad():
            pooler.eval()
            err = float(_loss(pooler(bytes_all[hold]), targets[hold], d))
            pooler.train()
            return err

    before = held_out_error()
    for _ in range(steps):
        pick = train_ids[torch.randint(0, train_ids.numel(), (batch,), generator=gen)]
        loss = _loss(pooler(bytes_all[pick]), targets[pick], d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pooler.parameters(), 1.0)
        opt.step()
        sched.step()
    after = held_out_error()
    log.info("byte-pool-learned: held-out regression error %.4f -> %.4f (%d steps)", before, after, steps)
    return pooler.eval(), {"heldout_error_before": round(before, 4), "heldout_error_after": round(after, 4)}


def _cache_key(base: Vocab, base_input: torch.Tensor, base_output: torch.Tensor | None, params: dict) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update(b"\x00".join(base.token_bytes))
    for matrix in (base_input, base_output):
        if matrix is not None:
            h.update(str(tuple(matrix.shape)).encode())
            h.update(matrix[: min(64, matrix.shape[0])].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def cached_pooler(base: Vocab, base_input: torch.Tensor, base_output: torch.Tensor | None, params: dict,
                  use_cache: bool = True) -> tuple[BytePooler, dict]:
    from safetensors.torch import load_file, save_file

    from transplant.cache import cache_dir

    key = _cache_key(base, base_input, base_output, params)
    path = Path(cache_dir()) / "byte_pool" / f"{key}.safetensors"
    d = base_input.shape[1]
    outputs = 1 if base_output is None else 2
    if use_cache and path.exists():
        pooler = BytePooler(d, params["dim"], params["max_bytes"], outputs=outputs)
        pooler.load_state_dict(load_file(str(path)))
        return pooler.eval(), {"cached": str(path)}
    pooler, stats = fit_pooler(base, base_input, base_output, **params)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in pooler.state_dict().items()}, str(tmp))
        tmp.replace(path)
    return pooler, stats


OPTIONS = (
    Option("steps", int, 1500, "training steps of the pooler", min=1),
    Option("dim", int, 128, "width of the pooler's byte embeddings", min=1),
    Option("max_bytes", int, 16, "bytes of a token the pooler reads (longer tokens are cut)", min=1),
    Option("lr", float, 3e-3, "learning rate", min=0.0),
    Option("seed", int, 0, "random seed"),
    Option("cache", bool, True, "reuse a pooler trained on the same base with the same settings"),
)


@register("byte-pool-learned", options=OPTIONS)
def byte_pool_learned_init(ctx: InitContext) -> InitPlan:
    params = {key: ctx.options[key] for key in ("steps", "dim", "max_bytes", "lr", "seed")}
    use_cache = ctx.options["cache"]
    base_in, base_out = ctx.base_input.cpu(), None if ctx.base_output is None else ctx.base_output.cpu()
    pooler, stats = cached_pooler(ctx.base_vocab, base_in, base_out, params, use_cache)
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    weights = sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab)))
    new_ids = ctx.alignment.unshared_new_ids
    has = torch.tensor([bool(ctx.new_vocab.token_bytes[i]) for i in new_ids.tolist()], dtype=torch.bool)
    predicted, unfilled = new_ids[has], new_ids[~has]
    with torch.no_grad():
        chunks = [pooler(byte_matrix([ctx.new_vocab.token_bytes[i] for i in predicted[s : s + 4096].tolist()],
                                     params["max_bytes"])) for s in range(0, predicted.numel(), 4096)]
    pred = torch.cat(chunks) if chunks else torch.zeros(0, pooler.mean.numel())
    d = ctx.base_input.shape[1]
    population = normal_base_ids(ctx.base_vocab)

    def dense(role: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        part = pred[:, d:] if role == "output" and pred.shape[1] > d else pred[:, :d]
        mean = row_mean(base, population)
        return torch.cat([predicted, unfilled]), torch.cat([part.to(base.device),
                                                            mean.expand(int(unfilled.numel()), -1)])

    return InitPlan(weights, dense_rows=dense,
                    notes={**stats, **params, "predicted": int(predicted.numel()),
                           "mean_filled": int(unfilled.numel())})
