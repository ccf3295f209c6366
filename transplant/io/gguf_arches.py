"""What `export-gguf` writes per architecture: llama.cpp's architecture name, its hyperparameter keys, and the
tensor transformations its own converter (`convert_hf_to_gguf.py`) applies, so that llama.cpp computes what
transformers computes.

* `llama` (`LlamaForCausalLM`, `MistralForCausalLM`): q/k rows permuted to llama.cpp's rotary layout; rope
  default, linear or llama3 (the last as a `rope_freqs` tensor).
* `qwen2` (`Qwen2ForCausalLM`): the converter's generic keys; q/k/v biases kept; no permutation (llama.cpp
  runs qwen2 with NeoX-style rope, as transformers does). Sliding-window attention is refused: llama.cpp's
  qwen2 has none.
* `gemma3` (`Gemma3ForCausalLM`): every RMSNorm weight (`*norm.weight`, q/k norms included) stored as w + 1,
  because Gemma computes x * (1 + w) and llama.cpp x * w; the embedding's sqrt(hidden) scaling is llama.cpp's
  own. Keys: the global rope base (`rope.freq_base`) and the local one (`rope.freq_base_swa`), the sliding
  window, key/value length = head_dim; attention logit softcapping must be absent. llama.cpp assumes every
  6th layer is global and scales attention by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B):
  other layer layouts are written as a per-layer `sliding_window_pattern`, another attention scale is refused.

Unlike the converter, rows beyond the tokenizer are kept (as UNUSED `[PADn]` tokens, see `gguf_vocab`) rather
than cut off: llama.cpp accepts either, and a tied output then keeps the model's own shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

GEMMA3_SWA_PATTERN = 6  # llama.cpp: layers 0-4 local, 5 global, ...


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture becomes one llama.cpp architecture."""

    name: str  # llama.cpp's architecture (`general.architecture`)
    enum: str  # its gguf.MODEL_ARCH member, for the tensor name map
    permute_qk: bool  # llama.cpp's llama rope layout needs the q/k rows permuted
    norm_shift: float  # added to every `*norm.weight`
    rope_types: tuple[str, ...]
    write_hparams: Callable[[object, dict, int, str], None]  # (writer, config, rows, name)
    check: Callable[[dict, Path], None]


def rope(config: dict, default_theta: float = 10000.0) -> tuple[float, dict]:
    """(rope theta, scaling parameters with a `rope_type`) in transformers 4.x or 5.x spelling; for per-layer-
    type parameters (Gemma-3's `full_attention`/`sliding_attention`) those of the global layers."""
    params = config.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", default_theta))
    merged = {**params, **scaling}
    merged["rope_type"] = merged.get("rope_type", merged.get("type", "default")) or "default"
    return float(theta if theta is not None else default_theta), merged


def local_rope_theta(config: dict) -> float | None:
    """The rope base of sliding-window layers (Gemma-3: 10000), where the config gives one."""
    params = config.get("rope_parameters") or {}
    theta = (params.get("sliding_attention") or {}).get("rope_theta", config.get("rope_local_base_freq"))
    return None if theta is None else float(theta)


def attention_shape(config: dict) -> tuple[int, int, int]:
    """(heads, kv heads, head dim); a one-line error when a field the export needs is missing."""
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        int(config["num_hidden_layers"]), int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise TransplantError(f"config.json lacks the field {err}; pass a causal LM model folder") from err
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return heads, kv_heads, int(config.get("head_dim") or hidden // heads)


def _common(writer, config: dict, name: str) -> None:
    """The keys every architecture here shares (the converter's generic `TextModel` ones)."""
    heads, kv_heads, _ = attention_shape(config)
    writer.add_name(name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))


def _linear_scaling(writer, scaling: dict) -> None:
    if scaling["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _llama_hparams(writer, config: dict, rows: int, name: str) -> None:
    hidden = int(config["hidden_size"])
    heads, _, head_dim = attention_shape(config)
    theta, scaling = rope(config)
    _common(writer, config, name)
    writer.add_rope_freq_base(theta)
    writer.add_vocab_size(rows)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _linear_scaling(writer, scaling)


def _qwen2_hparams(writer, config: dict, rows: int, name: str) -> None:
    theta, scaling = rope(config)
    _common(writer, config, name)
    writer.add_rope_freq_base(theta)
    if config.get("head_dim"):
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    _linear_scaling(writer, scaling)


def gemma3_layer_types(config: dict) -> list[bool]:
    """Per layer: is it a sliding-window (local) layer, as transformers builds the model."""
    layers = int(config["num_hidden_layers"])
    types = config.get("layer_types")
    if types:
        return [t == "sliding_attention" for t in types]
    pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern")
                  or GEMMA3_SWA_PATTERN)
    return [(i + 1) % pattern != 0 for i in range(layers)]


def _gemma3_hparams(writer, config: dict, rows: int, name: str) -> None:
    _, _, head_dim = attention_shape(config)
    theta, scaling = rope(config, default_theta=1_000_000.0)
    _common(writer, config, name)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    if (local := local_rope_theta(config)) is not None:
        writer.add_rope_freq_base_swa(local)
    _linear_scaling(writer, scaling)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
        local_layers = gemma3_layer_types(config)
        default = [(i + 1) % GEMMA3_SWA_PATTERN != 0 for i in range(len(local_layers))]
        if local_layers != default:  # llama.cpp reads the per-layer array; the converter never writes it
            writer.add_sliding_window_pattern(local_layers)


def _no_check(config: dict, model_dir: Path) -> None:
    return None


def _check_qwen2(config: dict, model_dir: Path) -> None:
    if config.get("use_sliding_window"):
        raise TransplantError(f"{model_dir} uses Qwen2 sliding-window attention (use_sliding_window), "
                              "which llama.cpp's qwen2 does not have; export-gguf refuses a GGUF that would "
                              "compute other logits")


def _check_gemma3(config: dict, model_dir: Path) -> None:
    heads, _, head_dim = attention_shape(config)
    if config.get("attn_logit_softcapping") is not None:
        raise TransplantError(f"{model_dir} sets attn_logit_softcapping, which Gemma-3 in llama.cpp does not "
                              "have; unset it in config.json if the weights were trained without it")
    # llama.cpp's Gemma-3 attention scale: 1/sqrt(head_dim), except the 62-layer 27B: 1/sqrt(hidden/heads)
    scaled_by = (int(config["hidden_size"]) // heads if int(config["num_hidden_layers"]) == 62
                 else head_dim)
    scalar = config.get("query_pre_attn_scalar", 256)
    if scalar is not None and int(scalar) != scaled_by:
        raise TransplantError(f"{model_dir}: query_pre_attn_scalar {scalar} differs from {scaled_by}, by "
                              "whose square root llama.cpp scales this Gemma-3's attention; the GGUF would "
                              "compute other logits, so export-gguf refuses it")


LLAMA = ArchSpec("llama", "LLAMA", True, 0.0, ("default", "linear", "llama3"), _llama_hparams, _no_check)
QWEN2 = ArchSpec("qwen2", "QWEN2", False, 0.0, ("default", "linear"), _qwen2_hparams, _check_qwen2)
GEMMA3 = ArchSpec("gemma3", "GEMMA3", False, 1.0, ("default", "linear"), _gemma3_hparams, _check_gemma3)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": QWEN2,
    "Gemma3ForCausalLM": GEMMA3,
}
