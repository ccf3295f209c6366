"""Offline without HF_HUB_OFFLINE fails after one short probe, not after huggingface_hub's retries; a GGUF
base's warning says what the file stored (issue 25)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cli import transplant_main
from transplant.assets import catalog
from transplant.assets.gguf_sources import precision_note
from transplant.io.gguf_export import export_gguf


@pytest.fixture
def silent_hub(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, and a hub endpoint that refuses connections; the hub client must not be reached."""
    import huggingface_hub

    def never(*args, **kwargs):
        raise AssertionError("huggingface_hub was called although the probe said the hub is unreachable")

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(huggingface_hub, "list_repo_files", never)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    monkeypatch.chdir(tmp_path)
    catalog._hub_unreachable.cache_clear()
    yield
    catalog._hub_unreachable.cache_clear()


def test_hub_alias_offline_is_one_line_after_one_probe(silent_hub, tmp_path):
    done = CliRunner().invoke(transplant_main,
                              ["--base", "llama", "--donor", "mistral", "-o", str(tmp_path / "o")])
    assert done.exit_code == 2, done.output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not reach the Hugging Face hub"), lines
    assert "did not answer within 2 s" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert "smollm2-135m" in lines[0]  # the offline aliases are named


def test_gguf_note_states_the_stored_type(tiny_pair, tmp_path):
    for outtype, expected in (("f32", "read as float32 exactly"), ("q8_0", "stored quantized as Q8_0")):
        path = export_gguf(tiny_pair["base_tied"], tmp_path / f"m-{outtype}.gguf", outtype=outtype).path
        note = precision_note(path)
        assert expected in note, note
        assert ("quantization error stays" in note) == (outtype != "f32")
