"""The frozen base LM run on *predicted* embedding rows, for any transformers causal LM.

Training scores a sampled tokenizer by feeding the hypernetwork's rows through the base model, so the rows
must enter and leave the model exactly where the model's own rows do:
- Input: through the model's own input-embedding module, with its weight swapped for the predicted rows
  (`torch.func.functional_call`). Gemma-family modules scale by sqrt(d) inside `forward`, which
  `inputs_embeds=` would bypass (a silent ~25x error on gemma3-270m); GPT-2/OPT add position embeddings in
  the decoder, which `inputs_embeds=` keeps. `padding_idx` is cleared on a shallow copy of the module: the
  predicted rows are indexed by *local* ids, and a padding_idx would zero the gradient of whichever token
  happens to sit at that local index.
- Body: `get_decoder()` (LlamaModel, Gemma3TextModel, GPT2Model, GPTNeoXModel, ...), not a Llama-only
  attribute name.
- Output: the model's own output-embedding module (a Linear, with its bias when it has one) on the predicted
  rows, then the logit post-processing the model's `forward` applies: Gemma 2/3 soft-capping
  (`final_logit_softcapping`), Cohere's `logit_scale`, Granite's `logits_scaling`.
`tests/test_hypernet_arch.py` checks every path against the model's own forward on tiny Llama, Gemma-3, GPT-2
and GPT-NeoX models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from transplant.errors import TransplantError


@dataclass
class LMParts:
    """What the training loss needs from a causal LM, found once per run."""

    embedding: nn.Module  # the input-embedding module (a shallow copy without padding_idx)
    decoder: nn.Module  # the body: embeddings in, last hidden states out
    output: nn.Module  # the output-embedding module (lm_head), shallow copy
    base_input: torch.Tensor  # [V, D] frozen input rows (the base vocabulary)
    base_output: torch.Tensor | None  # [V, D] frozen output rows; None when tied
    output_bias: torch.Tensor | None  # [V] lm_head bias, or None
    softcap: float | None  # final_logit_softcapping
    logit_multiplier: float  # logit_scale (Cohere) or 1 / logits_scaling (Granite), else 1

    @property
    def tied(self) -> bool:
        return self.base_output is None


HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
              "_backward_pre_hooks")


def _shell(module: nn.Module) -> nn.Module:
    """A shallow copy whose own attributes can be changed without touching the model (parameters shared), and
    without the model's hooks: the shell only ever runs on rows we pass in, so ZeRO-3's gather hooks (a
    sharded LM) must not fire on it."""
    shell = copy.copy(module)
    for name in HOOK_DICTS:
        if name in shell.__dict__:
            setattr(shell, name, type(shell.__dict__[name])())
    if getattr(shell, "padding_idx", None) is not None:
        shell.padding_idx = None
    return shell


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """A detached full copy of a parameter, gathered first when ZeRO-3 holds only this process's shard of
    it."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()
    return param.detach()


def lm_parts(lm: nn.Module) -> LMParts:
    """The pieces of a transformers causal LM, or a one-line error for a model that hides them."""
    embedding, output = lm.get_input_embeddings(), lm.get_output_embeddings()
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if embedding is None or output is None or decoder is None or decoder is lm:
        raise TransplantError(f"{type(lm).__name__} does not expose its input/output embeddings and decoder "
                              "(get_input_embeddings, get_output_embeddings, get_decoder); use a causal LM "
                              "from transformers")
    if not isinstance(getattr(output, "weight", None), torch.Tensor):
        raise TransplantError(f"{type(lm).__name__}'s output layer has no weight matrix; the hypernetwork "
                              "predicts output rows, so it needs a linear lm_head")
    base_input = full_tensor(embedding.weight)
    tied = output.weight is embedding.weight or (
        output.weight.numel() > 0 and output.weight.data_ptr() == embedding.weight.data_ptr())
    bias = getattr(output, "bias", None)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    multiplier = float(getattr(config, "logit_scale", None) or 1.0)
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        multiplier /= float(scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LMParts(_shell(embedding), decoder, _shell(output), base_input,
                   None if tied else full_tensor(output.weight),
                   full_tensor(bias) if isinstance(bias, torch.Tensor) else None,
                   float(softcap) if softcap else None, multiplier)


def embed(parts: LMParts, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of `ids` (local indices into `rows`) through the model's own embedding module."""
    return functional_call(parts.embedding, {"weight": rows}, (ids,))


def hidden_states(parts: LMParts, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, D] of the decoder body on the given input embeddings."""
    out = parts.decoder(inputs_embeds=embeds, attention_mask=attention_mask.long(), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def output_logits(parts: LMParts, hidden: torch.Tensor, rows: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits over `rows` through the model's own output module, soft-capped and scaled as its forward
    does."""
    params: dict[str, Any] = {"weight": rows}
    if parts.output_bias is not None:
        params["bias"] = bias if bias is not None else torch.zeros(rows.shape[0], dtype=rows.dtype,
                                                                     device=rows.device)
    logits = functional_call(parts.output, params, (hidden,))
    return postprocess_logits(logits, parts.softcap, parts.logit_multiplier)


def postprocess_logits(logits: torch.Tensor, softcap: float | None, multiplier: float = 1.0) -> torch.Tensor:
    """What the causal-LM head does after the matmul (same order as transformers: scale, then cap)."""
    if multiplier != 1.0:
        logits = logits * multiplier
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
