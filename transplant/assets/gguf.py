"""Turn a GGUF checkpoint into a plain Hugging Face model dir (safetensors + tokenizer files).

The offline reference models ship only as quantized GGUF files. transformers can load a GGUF (`gguf_file=`)
and dequantizes it, but the loaded model keeps a `quantization_config` and refuses `save_pretrained`; every
other module of this project wants an ordinary dir that stock `AutoModelForCausalLM`/`AutoTokenizer` read. So
we dequantize once, move the tensors into a fresh model built from the same config without the quantization
entry, save with safetensors and check that the saved dir gives the same logits as the GGUF model.

Tokenizers need care too:
- transformers 5.x saves `tokenizer_class: TokenizersBackend`, which 4.x cannot load; we write our own
  `tokenizer_config.json` naming `PreTrainedTokenizerFast`, which both read.
- llama.cpp's converter turned SentencePiece user-defined whitespace tokens (`▁▁`, `▁▁▁`, ...) into literal
  spaces, and transformers' GGUF converter then treats them as ordinary BPE pieces reached by merges, so a run
  of 38 spaces becomes 16+22 instead of sentencepiece's greedy 31+7. `whitespace_runs` restores them as added
  tokens.
- SmolLM2's own tokenizer splits digits one by one before byte-level BPE (llama.cpp pre-tokenizer "smollm");
  transformers' GGUF converter drops that step (harmless for this vocab, which has no multi-digit tokens, but
  we restore it so the file says what the model was trained with).

The conversion is checked, not assumed: saved logits equal the GGUF model's and the tokenizers give
sentencepiece's ids (tests/test_assets.py; timings and memory in bench/RESULTS.md).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Text used to check tokenizer round trips and logits right after conversion (tests check far more text).
SAMPLE_TEXT = (
    "The capital of France is Paris.  Two  spaces,\tTabs\tand\n\nnew lines.\n"
    "Über straße café naïve — «quoted» 日本語のテキスト 中文 русский текст 🙂👍🏽\n"
    "def add(a, b):\n    return a + b  # 12345 + 0.5 = 12345.5\n" + " " * 38 + "end\n"
)


def apply_tokenizer_fixes(backend, fixes: tuple[str, ...]) -> None:
    """Patch a `tokenizers.Tokenizer` built by transformers from a GGUF (see the module docstring)."""
    from tokenizers import AddedToken, pre_tokenizers

    for fix in fixes:
        if fix == "digits":
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ])
        elif fix == "whitespace_runs":
            runs = sorted((tok for tok in backend.get_vocab() if len(tok) >= 2 and set(tok)
                           == {"▁"}), key=len)
            backend.add_tokens([AddedToken(tok, normalized=True, special=False) for tok in runs])
            log.info("restored %d whitespace-run tokens as user-defined (added) tokens", len(runs))
        else:
            raise ValueError(f"unknown tokenizer fix {fix!r}")


def load_gguf_tokenizer(gguf_path: Path, fixes: tuple[str, ...] = ()):
    """The GGUF's tokenizer as a `PreTrainedTokenizerFast` with our fixes applied."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    loaded = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    backend = loaded.backend_tokenizer
    apply_tokenizer_fixes(backend, fixes)
    specials = {key: getattr(loaded, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   **{k: v for k, v in specials.items() if v is not None})
    fast.chat_template = loaded.chat_template
    return fast


def check_round_trip(tokenizer, text: str = SAMPLE_TEXT) -> None:
    """decode(encode(x)) must give x back exactly; a lossy tokenizer would make every BPB number wrong."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if back != text:
        raise RuntimeError(f"tokenizer round trip is lossy: {text[:60]!r} -> {back[:60]!r}")


def write_tokenizer_files(tokenizer, dest: Path, *, model_max_length: int, chat_template: str | None) -> None:
    """tokenizer.json + a tokenizer_config.json that transformers 4.x and 5.x both load."""
    tokenizer.backend_tokenizer.save(str(dest / "tokenizer.json"))
    # model_input_names: 4.x's PreTrainedTokenizerFast otherwise returns token_type_ids, which generate()
    # rejects.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, key)
        if value is not None:
            config[key] = str(value)
    template = chat_template or tokenizer.chat_template
    if template:
        config["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if key in config}
    (dest / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False)
                                                  + "\n")


def add_legacy_config_keys(config: dict) -> dict:
    """Add the pre-5.0 spellings (rope_theta, rope_local_base_freq, torch_dtype) next to 5.x's
    rope_parameters.

    transformers 4.x ignores `rope_parameters` and would fall back to its default rope base (10,000 for
    Llama), silently changing the model; 5.x reads `rope_parameters` and accepts the extra keys.
    """
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        full = rope.get("full_attention", rope)
        if full.get("rope_type", "default") == "default":
            config.setdefault("rope_theta", full["rope_theta"])
            config.setdefault("rope_scaling", None)
        if "sliding_attention" in rope:
            config.setdefault("rope_local_base_freq", rope["sliding_attention"]["rope_theta"])
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    return config


def _plain_model(quantized):
    """Move the dequantized tensors into a fresh model whose config has no quantization entry."""
    from transformers import AutoModelForCausalLM

    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=quantized.dtype)
    fresh.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    fresh.generation_config = quantized.generation_config
    return fresh.eval()


def _load_gguf_model(gguf_path: Path, dtype: torch.dtype):
    """transformers' GGUF loader (dequantizes), with its refusals as one-line errors."""
    from transformers import AutoModelForCausalLM

    from transplant.errors import TransplantError, first_line

    try:
        return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError, OSError) as err:
        reason = first_line(err)
        raise TransplantError(f"transformers cannot load the weights of {gguf_path} ({reason}); "
                              "pass the model's Hugging Face folder (config.json + "
                              "safetensors) instead") from err


def _save_without_deepspeed(model, directory: Path) -> None:
    """`save_pretrained`, without accelerate importing DeepSpeed to look for an engine wrapper: a plain
    transplant never trains, and importing DeepSpeed costs seconds and prints an accelerator warning."""
    from unittest import mock

    try:
        import accelerate.utils.other as accelerate_other
    except ImportError:  # no accelerate: nothing imports DeepSpeed on this path
        model.save_pretrained(directory, safe_serialization=True)
        return
    with mock.patch.object(accelerate_other, "is_deepspeed_available", return_value=False):
        model.save_pretrained(directory, safe_serialization=True)


def convert_gguf(gguf_path: Path, dest: Path, *, tokenizer_fixes: tuple[str, ...] = (),
                 chat_template: str | None = None, generation: dict | None = None,
                 dtype: torch.dtype = torch.float32, tokenizer=None) -> Path:
    """Write `dest` (a plain HF model dir) from `gguf_path`; nothing appears at `dest` unless every check
    passes.

    float32 is the default storage dtype: the dequantized values are not bf16-representable, so only fp32
    keeps the saved model bit-identical to the GGUF model (SmolLM2 517 MB, Gemma-3-270M 1.07 GB on disk).
    `tokenizer` (a fast tokenizer) replaces transformers' reading of the GGUF vocabulary (user GGUFs get ours,
    `transplant.tokenizers.load`, which rebuilds SentencePiece-style vocabularies exactly).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    from transplant.tokenizers.gguf_header import check_gguf

    check_gguf(gguf_path)  # every length in the header fits the file, before transformers' reader trusts one
    start = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model dir
    try:
        log.info("[1/4] reading the tokenizer from %s", gguf_path.name)
        if tokenizer is None:
            tokenizer = load_gguf_tokenizer(gguf_path, tokenizer_fixes)
        check_round_trip(tokenizer)

        log.info("[2/4] loading and dequantizing the weights (%.0f MB GGUF)",
                 gguf_path.stat().st_size / 2**20)
        quantized = _load_gguf_model(gguf_path, dtype)
        ids = torch.tensor([tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)[:64]])
        with torch.no_grad():
            reference = quantized(ids).logits
        model = _plain_model(quantized)
        del quantized

        log.info("[3/4] saving safetensors (%s) to %s", str(dtype).replace("torch.", ""), tmp)
        if generation:
            model.generation_config = GenerationConfig(**{**model.generation_config.to_diff_dict(),
                                                          **generation})
        _save_without_deepspeed(model, tmp)
        model_max_length = int(getattr(model.config, "max_position_embeddings", 2048))
        del model
        gc.collect()
        config_path = tmp / "config.json"
        config_path.write_text(json.dumps(add_legacy_config_keys(json.loads(config_path.read_text())),
                                          indent=2) + "\n")
        write_tokenizer_files(tokenizer, tmp, model_max_length=model_max_length, chat_template=chat_template)
        for item in tmp.iterdir():
            item.chmod(0o644)

        log.info("[4/4] checking the saved dir against the GGUF model")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        with torch.no_grad():
            diff = (reloaded(ids).logits - reference).abs().max().item()
        del reloaded
        if diff > 1e-4:
            raise RuntimeError(f"saved model's logits differ from the GGUF model's by {diff:.3g}")
        if dest.exists():  # someone else finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)
        log.info("converted %s in %.0f s (max |logit diff| %.2g)", gguf_path.name,
                 time.perf_counter() - start, diff)
        return dest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sentencepiece_reference(gguf_path: Path, *, unescape_user_defined: bool = True):
    """A `sentencepiece` processor rebuilt from a llama-style GGUF vocab: the reference the HF tokenizer must
    match.

    GGUF keeps pieces, scores and types but not the normalizer spec; we use what Gemma and Llama ship:
    identity normalization, whitespace escaped to ▁, no extra-whitespace removal, byte fallback.
    `unescape_user_defined` undoes llama.cpp's rewriting of ▁ to spaces in user-defined pieces.
    """
    import numpy as np
    import sentencepiece as spm
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = GGUFReader(gguf_path).fields

    def values(name: str) -> list:
        field = fields[name]
        return [field.parts[i] for i in field.data]

    tokens = [bytes(raw).decode("utf-8") for raw in values("tokenizer.ggml.tokens")]
    scores = np.concatenate(values("tokenizer.ggml.scores")).tolist()
    types = np.concatenate(values("tokenizer.ggml.token_type")).tolist()
    model = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        entry = model.pieces.add()
        entry.piece = piece.replace(" ", "▁") if (kind == 4 and unescape_user_defined) else piece
        entry.score = score
        entry.type = kind  # GGUF token types use sentencepiece's numbering
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    for key, field_name in (("unk_id", "unknown_token_id"), ("bos_id", "bos_token_id"),
                            ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id")):
        if f"tokenizer.ggml.{field_name}" in fields:
            setattr(spec, key, int(fields[f"tokenizer.ggml.{field_name}"].contents()))
    norm = model.normalizer_spec
    norm.name = "identity"
    prefix_field = fields.get("tokenizer.ggml.add_space_prefix")
    norm.add_dummy_prefix = bool(prefix_field.contents()) if prefix_field is not None else True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())
