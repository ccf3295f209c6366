"""The ZeTT-style hypernetwork: a new token's embedding predicted from the base pieces its bytes split into.

A target token is first decomposed the way the base model would have seen its bytes (the base tokenizer's own
segmentation, `segment_with_base`), so the network reads the token in the base model's own "language". The
pieces are embedded with the FROZEN base embeddings (input and output rows concatenated when the model is
untied), read by a small transformer encoder and pooled; two heads predict the input and output rows.

The prediction is a residual on FVT: `row = mean(piece rows) + std · head(h)`, with the heads
zero-initialised. So an untrained hypernetwork is exactly FVT, training can only move away from it where the
loss says so, and the head's output lives on the scale of the base embeddings (`std` is their global standard
deviation).

Checkpoints are a directory with `hypernet.safetensors` and `config.json` (no pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transplant.errors import TransplantError
from transplant.tokenizers.segment import greedy_segment, segment_with_base
from transplant.tokenizers.vocab import Vocab

WEIGHTS_FILE = "hypernet.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class HypernetConfig:
    base_dim: int  # hidden size of the base model's embeddings
    base_vocab_size: int
    # base has a separate lm_head: pieces carry both rows, a second head predicts outputs
    untied: bool = False
    d_model: int = 256
    layers: int = 2
    heads: int = 4
    ff_mult: int = 2
    max_pieces: int = 8  # longer decompositions are truncated (the tail of a very long token matters least)
    pooling: str = "first"  # "first" (a learned summary slot) or "mean"
    dropout: float = 0.0
    base_name: str = ""  # what the hypernetwork was trained for (informational)


class Hypernet(nn.Module):
    def __init__(self, config: HypernetConfig, input_std: float = 1.0, output_std: float = 1.0):
        super().__init__()
        self.config = config
        feat = config.base_dim * (2 if config.untied else 1)
        self.in_proj = nn.Linear(feat, config.d_model)
        self.summary = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.positions = nn.Embedding(config.max_pieces + 1, config.d_model)
        layer = nn.TransformerEncoderLayer(config.d_model, config.heads, config.d_model * config.ff_mult,
                                           dropout=config.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.d_model)
        self.input_head = nn.Linear(config.d_model, config.base_dim)
        self.output_head = nn.Linear(config.d_model, config.base_dim) if config.untied else None
        for head in (self.input_head, self.output_head):
            if head is not None:  # zero residual: the untrained network is FVT
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        self.register_buffer("input_std", torch.tensor(float(input_std)))
        self.register_buffer("output_std", torch.tensor(float(output_std)))

    def forward(self, piece_ids: torch.Tensor, mask: torch.Tensor, base_input: torch.Tensor,
                base_output: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [N, D] for the input and output embedding of N tokens given as padded base-piece ids [N, P].

        Every row of `mask` must have at least one True (tokens without pieces are the caller's business)."""
        dtype = self.in_proj.weight.dtype  # fp32, or bf16 when DeepSpeed trains in bf16
        in_pieces = base_input[piece_ids].to(dtype)  # [N, P, D]
        out_pieces = base_output[piece_ids].to(dtype) if base_output is not None else in_pieces
        feats = torch.cat([in_pieces, out_pieces], -1) if self.config.untied else in_pieces
        maskf = mask.to(dtype)[..., None]
        count = maskf.sum(1).clamp_min(1.0)
        fvt_in = (in_pieces * maskf).sum(1) / count
        fvt_out = (out_pieces * maskf).sum(1) / count
        n, p = piece_ids.shape
        x = self.in_proj(feats) + self.positions(torch.arange(1, p + 1, device=feats.device))
        x = torch.cat([self.summary.expand(n, -1, -1) + self.positions.weight[0], x], 1)
        keep = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=mask.device), mask.bool()], 1)
        h = self.norm(self.encoder(x, src_key_padding_mask=~keep))
        if self.config.pooling == "mean":
            pooled = (h * keep.to(dtype)[..., None]).sum(1) / keep.to(dtype).sum(1, keepdim=True)
        else:
            pooled = h[:, 0]
        rows_in = fvt_in + self.input_std * self.input_head(pooled)
        if self.output_head is not None:
            rows_out = fvt_out + self.output_std * self.output_head(pooled)
        else:
            rows_out = rows_in
        return rows_in, rows_out


def pad_pieces(pieces: list[list[int]], max_pieces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded [N, P] id matrix and its mask from ragged piece lists (truncated to max_pieces, P >= 1)."""
    width = max(1, min(max_pieces, max((len(p) for p in pieces), default=1)))
    ids = torch.zeros(len(pieces), width, dtype=torch.long)
    mask = torch.zeros(len(pieces), width, dtype=torch.bool)
    for row, seq in enumerate(pieces):
        seq = seq[:max_pieces]
        if seq:
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = True
    return ids, mask


def decompose(base: Vocab, token_bytes: list[bytes], max_pieces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Base pieces of each target token (the base tokenizer's segmentation), padded: ids [N, P], mask [N,
    P]."""
    return pad_pieces(segment_with_base(base, token_bytes), max_pieces)


def decompose_without_self(base: Vocab, token_ids: list[int],
                           max_pieces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pieces of base tokens that exclude the token itself (longest strictly shorter pieces first).

    The base tokenizer maps a base token to itself, which teaches nothing; splitting it into shorter base
    pieces turns the base vocabulary into free (pieces -> known row) training pairs for the auxiliary loss."""
    table = base.bytes_to_id
    pieces = []
    for idx in token_ids:
        data = base.token_bytes[idx]
        pieces.append(greedy_segment(data, table, max(1, len(data) - 1)))
    return pad_pieces(pieces, max_pieces)


def base_stats(base_input: torch.Tensor, base_output: torch.Tensor | None) -> tuple[float, float]:
    in_std = float(base_input.float().std())
    out_std = float(base_output.float().std()) if base_output is not None else in_std
    return in_std, out_std


def save_hypernet(model: Hypernet, directory: str | Path) -> Path:
    """Weights (safetensors) and config (json) into `directory`, written to a temp name and renamed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # fp32 whatever it trained in (bf16 under DeepSpeed on GPUs): applying it is cheap, precision is not
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    tmp_cfg = directory / (CONFIG_FILE + ".tmp")
    tmp_cfg.write_text(json.dumps(asdict(model.config), indent=2))
    tmp_cfg.replace(directory / CONFIG_FILE)
    return directory


def load_hypernet(directory: str | Path) -> Hypernet:
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).exists() or not (directory / CONFIG_FILE).exists():
        raise TransplantError(
            f"{directory} is not a hypernetwork checkpoint (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "train one with `hypernet train RECIPE.yaml` and pass its output dir"
        )
    config = HypernetConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    model = Hypernet(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval()
