"""`transplant export-gguf`: a model folder -> one GGUF file for llama.cpp, written with the `gguf` package.

Why our own writer rather than wrapping llama.cpp's `convert_hf_to_gguf.py`: that script is not part of the
`gguf` package (it needs a llama.cpp checkout of a matching version), it picks the pre-tokenizer by hashing
the ids of known hub models, which a transplanted tokenizer on another model's weights may not match, it
typed Mistral's `[INST]` in our outputs as NORMAL, and for Gemma-3 it needs a `tokenizer.model` our outputs do
not have. Here the vocabulary comes from our own tokenizer reading (`transplant.io.gguf_vocab`: CONTROL,
USER_DEFINED, BYTE, UNUSED types, scores or merges, pre-tokenizer by behaviour) and the tensors and
hyperparameters follow llama.cpp's conventions per architecture (`transplant.io.gguf_arches`).

Supported: `LlamaForCausalLM` and `MistralForCausalLM` (llama.cpp's `llama`: SmolLM2, Llama 1-3, Mistral 7B),
`Qwen2ForCausalLM` (`qwen2`: Qwen2, Qwen2.5) and `Gemma3ForCausalLM` (`gemma3`: the text-only Gemma-3 models).
Anything else is refused with one line. Tensors stream one at a time from the safetensors shards into the file
(memory: one tensor), with a progress bar. Layout, as llama.cpp's converter: 1-D tensors float32, 2-D tensors
in the outtype (`q8_0` falls back to f16 for rows not a multiple of 32), a tied model without `output.weight`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from transplant.errors import TransplantError
from transplant.io import safetensors
from transplant.io.atomic import atomic_file
from transplant.io.gguf_arches import ARCHITECTURES, ArchSpec, attention_shape, rope
from transplant.io.gguf_meta import read_provenance, turn_end_ids, write_provenance
from transplant.io.gguf_vocab import CONTROL, GGUFVocab, describe_vocab, write_vocab
from transplant.io.model_config import config_says_tied, load_config

log = logging.getLogger(__name__)

SUPPORTED = {name: spec.name for name, spec in ARCHITECTURES.items()}  # HF class -> llama.cpp architecture
OUTTYPES = ("f16", "q8_0", "f32")
MARKER_KEY = "tokentransplant.version"  # an existing GGUF with this key may be replaced by --overwrite
SKIPPED = ("rotary_emb.inv_freq",)


@dataclass
class PlannedGGUFTensor:
    name: str  # GGUF name
    source: safetensors.TensorEntry | None
    qtype: int  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape, numpy order
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.qtype)]
        return math.prod(self.shape) // block * size


@dataclass
class ExportResult:
    path: Path
    architecture: str
    outtype: str
    tensors: int
    vocab: GGUFVocab

    @property
    def control_tokens(self) -> int:
        return self.vocab.types.count(CONTROL)


def _architecture(config: dict, model_dir: Path) -> ArchSpec:
    names = config.get("architectures") or [config.get("model_type", "unknown")]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise TransplantError(f"{model_dir} is {', '.join(map(str, names))}; export-gguf supports "
                          f"{', '.join(SUPPORTED)}; use llama.cpp's convert_hf_to_gguf.py for other "
                          "architectures")


def llama3_rope_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for llama3 rope scaling: per frequency, how much the scaled rope slows
    it (the ratio of transformers' default to llama3 inverse frequencies)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q/k rows (its converter's `LlamaModel.permute`; transformers' GGUF loader
    undoes it)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _qtype(shape: tuple[int, ...], outtype: str) -> int:
    import gguf

    if len(shape) < 2 or outtype == "f32":
        return gguf.GGMLQuantizationType.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _encode(tensor: torch.Tensor, qtype: int) -> np.ndarray:
    import gguf

    array = tensor.detach().float().contiguous().numpy()
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType(qtype))


def _plan(entries: dict, config: dict, spec: ArchSpec, outtype: str, tied: bool,
          model_dir: Path) -> list[PlannedGGUFTensor]:
    import gguf

    heads, kv_heads, _ = attention_shape(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.enum], config["num_hidden_layers"])
    planned = []
    for name, entry in entries.items():
        if name.endswith(SKIPPED) or (tied and name == "lm_head.weight"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TransplantError(f"{model_dir}: tensor {name} has no place in a {spec.name} GGUF; this is "
                                  "not a plain text model of its architecture, use llama.cpp's "
                                  "convert_hf_to_gguf.py")
        rotary = None
        if spec.permute_qk:
            rotary = heads if ".q_proj." in name else kv_heads if ".k_proj." in name else None
        shift = spec.norm_shift if name.endswith("norm.weight") else 0.0
        qtype = _qtype(entry.shape, outtype)

        def produce(entry=entry, rotary=rotary, shift=shift, qtype=qtype) -> np.ndarray:
            tensor = safetensors.load_tensor(entry)
            if rotary:
                tensor = permute(tensor, rotary)
            if shift:  # Gemma's RMSNorm computes x * (1 + w); llama.cpp's x * w
                tensor = tensor.float() + shift
            return _encode(tensor, qtype)

        planned.append(PlannedGGUFTensor(target, entry, qtype, entry.shape, produce))
    return planned


def is_our_gguf(path: Path) -> bool:
    """A GGUF this exporter wrote (it carries MARKER_KEY): the only kind `--overwrite` replaces."""
    from gguf import GGUFReader

    from transplant.tokenizers.gguf_header import check_gguf

    try:
        check_gguf(path)
        return GGUFReader(path).get_field(MARKER_KEY) is not None
    except Exception:  # not a GGUF, damaged, unreadable: not ours
        return False


def export_gguf(model_dir: str | Path, output: str | Path, *, outtype: str = "f16",
                overwrite: bool = False) -> ExportResult:
    """Write `model_dir` (an HF model folder of a supported architecture) as one GGUF file at `output`; see
    the module docstring for what is supported and how tensors and tokens are laid out."""
    import gguf

    from transplant.version import __version__

    if outtype not in OUTTYPES:
        raise TransplantError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    spec = _architecture(config, model_dir)
    arch = spec.name
    entries, _ = safetensors.weight_entries(model_dir)
    embed = entries.get("model.embed_tokens.weight")
    if embed is None:
        raise TransplantError(f"{model_dir} has no model.embed_tokens.weight; pass a causal LM model folder "
                              "saved by transformers")
    rows = embed.shape[0]
    vocab = describe_vocab(model_dir, rows, config)
    tied = "lm_head.weight" not in entries or config_says_tied(config) is True
    _, _, head_dim = attention_shape(config)
    theta, scaling = rope(config)
    if scaling["rope_type"] not in spec.rope_types:
        raise TransplantError(f"rope scaling {scaling['rope_type']!r} is not supported by export-gguf for "
                              f"{arch} ({', '.join(spec.rope_types)} are); use llama.cpp's "
                              "convert_hf_to_gguf.py")
    spec.check(config, model_dir)
    planned = _plan(entries, config, spec, outtype, tied, model_dir)
    if scaling["rope_type"] == "llama3":
        factors = llama3_rope_factors(theta, head_dim, scaling)
        planned.append(PlannedGGUFTensor("rope_freqs.weight", None, gguf.GGMLQuantizationType.F32,
                                         factors.shape, lambda: factors))
    estimate = sum(t.nbytes for t in planned) + 64 * 2**20
    with atomic_file(output, overwrite=overwrite, protected=[model_dir], estimate_bytes=estimate,
                     is_ours=is_our_gguf) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        provenance = read_provenance(model_dir)
        spec.write_hparams(writer, config, rows, provenance.name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)
        write_provenance(writer, provenance)
        eot, eom = turn_end_ids(vocab.tokens, vocab.chat_template)
        if eot is not None:
            writer.add_eot_token_id(eot)
        if eom is not None:
            writer.add_eom_token_id(eom)
        writer.add_string(MARKER_KEY, __version__)
        _write_tensors(writer, planned)
    log.info("wrote %s: %s, %d tensors, %d tokens (%d control)", output, outtype, len(planned),
             len(vocab.tokens), vocab.types.count(CONTROL))
    return ExportResult(Path(output).absolute(), arch, outtype, len(planned), vocab)


def _write_tensors(writer, planned: list[PlannedGGUFTensor]) -> None:
    """Header, metadata and tensor infos first, then each tensor's data, one tensor in memory at a time."""
    import gguf

    for tensor in planned:
        qtype = gguf.GGMLQuantizationType(tensor.qtype)
        quantized = qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        shape = gguf.quant_shape_to_byte_shape(tensor.shape, qtype) if quantized else tensor.shape
        dtype = np.uint8 if quantized else (np.float32 if qtype == gguf.GGMLQuantizationType.F32
                                            else np.float16)
        writer.add_tensor_info(tensor.name, shape, np.dtype(dtype), tensor.nbytes,
                               raw_dtype=qtype if quantized else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(t.nbytes for t in planned)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing GGUF", disable=None, leave=False) as bar:
        for tensor in planned:
            data = tensor.produce()
            if data.nbytes != tensor.nbytes:
                raise ValueError(f"{tensor.name}: produced {data.nbytes} bytes, planned {tensor.nbytes}")
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
    writer.close()
