"""End to end on tiny models: transplant(), the CLI, the report, extension and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import transplant
from cli import transplant_main
from transplant.assets import load_vocab
from transplant.eval.bpb import bits_per_byte

TEXT = "The cat sat on the catalog. for i in range(3): print(i) 12345 café"


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("base_key", ["base_tied", "base_untied"])
@pytest.mark.parametrize("method", ["fvt", "mean", "zero", "random", "byte-pool"])
def test_transplant_tokenizer_only_donor(tiny_pair, tmp_path, base_key, method):
    out = tmp_path / "out"
    result = transplant.transplant(tiny_pair[base_key], tiny_pair["donor_tok"], method=method, output=out,
                                   eval_texts={"sample": TEXT})
    assert result.output == out and (out / "config.json").exists()
    model, tokenizer = _load(out)
    donor = load_vocab(tiny_pair["donor_tok"])
    assert model.config.vocab_size == len(donor) == model.get_input_embeddings().weight.shape[0]
    assert tokenizer.encode(TEXT, add_special_tokens=False) == donor.encode(TEXT)
    base_model, _ = _load(tiny_pair[base_key])
    for name, tensor in base_model.state_dict().items():  # everything but the embeddings is copied through
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(tensor, model.state_dict()[name]), name
    # shared tokens are copied exactly
    base_vocab = load_vocab(tiny_pair[base_key])
    shared = [(i, base_vocab.bytes_to_id[b]) for i, b in enumerate(donor.token_bytes)
              if b in base_vocab.bytes_to_id]
    new_emb, old_emb = model.get_input_embeddings().weight, base_model.get_input_embeddings().weight
    for new_id, old_id in shared[:50]:
        assert torch.equal(new_emb[new_id], old_emb[old_id])
    assert model.config.tie_word_embeddings == (base_key == "base_tied")
    generated = model.generate(torch.tensor([tokenizer.encode("The cat")]), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] >= 3
    assert result.bpb_before is not None and result.bpb_after is not None and result.bpb_after > 0
    report = json.loads((out / "report.json").read_text())
    # + bos, eos, pad by role
    assert report["method"] == method and report["statistics"]["shared"] == len(shared) + 3
    assert (out / "report.md").exists() and (out / "README.md").read_text().count("tokentransplant") >= 1


@pytest.mark.parametrize("method,options",
                         [("omp", {"k": 4}), ("knn", {"k": 4}), ("sparsemax-knn", {"top_m": 4})])
def test_donor_model_methods(tiny_pair, tmp_path, method, options):
    out = tmp_path / "out"
    result = transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_model"], method=method,
                                   output=out, options=options)
    report = json.loads((out / "report.json").read_text())
    assert report["reconstruction_error"]["n"] > 0
    # the whole-tool time split: every phase measured once, in order, and together the transplant's seconds
    phases = report["seconds_by_phase"]
    assert list(phases) == ["resolve", "load tokenizers", "align", "load embeddings", "solve", "write"]
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= result.seconds + 0.05
    assert 0 <= report["reconstruction_error"]["median"] <= 1.0 + 1e-6
    model, _ = _load(out)
    assert torch.isfinite(model.get_input_embeddings().weight).all()
    # the donor has its own lm_head, but a tied base stays tied unless the user asks (--set untie=true)
    assert model.config.tie_word_embeddings is True
    assert result.method == method


def test_default_method_is_fvt_ls_with_donor_model_and_byte_pool_without(tiny_pair, tmp_path):
    assert transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_model"],
                                 output=tmp_path / "a").method == "fvt-ls"
    assert transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"],
                                 output=tmp_path / "b").method == "byte-pool"


def test_pad_to_multiple_and_dtype(tiny_pair, tmp_path):
    out = tmp_path / "out"
    transplant.transplant(tiny_pair["base_untied"], tiny_pair["donor_tok"], output=out, pad_to_multiple_of=64,
                          dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size


def test_extend_vocab_keeps_ids_and_shortens_domain_text(tiny_pair, tmp_path):
    domain = "tokentransplant transplants tokenizers; tokentransplant heals models. " * 30
    base_vocab = load_vocab(tiny_pair["base_untied"])
    result = transplant.extend_vocab(tiny_pair["base_untied"], corpus=domain, n=20, output=tmp_path / "ext")
    added = result.extra["added_tokens"]
    assert 0 < len(added) <= 20
    model, tokenizer = _load(tmp_path / "ext")
    assert len(tokenizer) == len(base_vocab) + len(added) == model.config.vocab_size
    old = base_vocab.encode(domain)
    new = tokenizer.encode(domain, add_special_tokens=False)
    assert len(new) < len(old)
    assert tokenizer.decode(new) == domain
    ordinary = "The cat sat."  # text without the new tokens keeps its ids
    assert tokenizer.encode(ordinary, add_special_tokens=False) == base_vocab.encode(ordinary)
    old_model, _ = _load(tiny_pair["base_untied"])
    n_old = len(base_vocab)
    assert torch.equal(model.get_input_embeddings().weight[:n_old],
                       old_model.get_input_embeddings().weight[:n_old])


def test_extend_vocab_given_tokens(tiny_pair, tmp_path):
    result = transplant.extend_vocab(tiny_pair["base_untied"], new_tokens=[" tokentransplant"],
                                     output=tmp_path / "ext")
    _, tokenizer = _load(tmp_path / "ext")
    ids = tokenizer.encode("a tokentransplant", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[-1] == "Ġtokentransplant"
    assert result.extra["added_tokens"][-1] == "Ġtokentransplant"


def test_bits_per_byte_prefers_the_real_model(tiny_pair):
    model, tokenizer = _load(tiny_pair["base_untied"])
    score = bits_per_byte(model, tokenizer, TEXT)
    assert 0 < score < 40


# ---------------------------------------------------------------- CLI and bad input


def _cli(args):
    return CliRunner().invoke(transplant_main, [str(a) for a in args])


def test_cli_transplant_prints_summary(tiny_pair, tmp_path):
    result = _cli(["--base", tiny_pair["base_tied"], "--donor", tiny_pair["donor_tok"], "-o", tmp_path / "o",
                   "--eval-bytes", "0"])
    assert result.exit_code == 0, result.output
    assert "shared with the base" in result.output and str(tmp_path / "o") in result.output


@pytest.mark.parametrize("args, message", [
    (["--base", "/nonexistent/model", "--donor", "x"], "no such file"),
    (["--base", "{base}", "--donor", "/nonexistent/tok.json"], "no such file"),
    (["--base", "{base}", "--donor", "{donor}", "--method", "nope"], "unknown method"),
    (["--base", "{base}", "--donor", "{donor}", "--method", "omp"], "needs donor embeddings"),
    (["--base", "{donor}", "--donor", "{donor}"], "not a model"),
    (["--base", "{base}"], "both --base and --donor"),
])
def test_cli_user_errors_one_line_exit_2(tiny_pair, tmp_path, args, message):
    args = [a.format(base=tiny_pair["base_tied"], donor=tiny_pair["donor_tok"]) for a in args]
    result = _cli(args + ["-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_existing_output_needs_overwrite(tiny_pair, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    result = _cli(["--base", tiny_pair["base_tied"], "--donor", tiny_pair["donor_tok"], "-o", out,
                   "--eval-bytes", "0"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    ok = _cli(["--base", tiny_pair["base_tied"], "--donor", tiny_pair["donor_tok"], "-o", out, "--eval-bytes",
               "0", "--overwrite"])
    assert ok.exit_code == 0, ok.output


def test_cli_corrupt_tokenizer(tiny_pair, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    result = _cli(["--base", tiny_pair["base_tied"], "--donor", bad, "-o", tmp_path / "o"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_console_script_exit_code(tiny_pair, tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from cli import transplant_main; transplant_main()",
                           "--base", "/nonexistent", "--donor", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_cli_eval_table(tiny_pair, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    result = _cli(["eval", tiny_pair["base_tied"], tiny_pair["base_untied"], "--text", text])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and all(float(line.split("\t")[1]) > 0 for line in lines[1:])


def test_cli_eval_with_lm_eval_tasks(tiny_pair, tmp_path):
    result = _cli(["eval", tiny_pair["base_tied"], "--tasks", "tt_mc_small", "--limit", "4", "--save-dir",
                   tmp_path / "eval"])
    assert result.exit_code == 0, result.output
    assert "tt_mc_small" in result.output and str(tiny_pair["base_tied"]) in result.output
    assert (tmp_path / "eval" / "lm_eval_command.txt").is_file()


def test_failed_evaluation_leaves_no_output(tiny_pair, tmp_path, monkeypatch):
    """The report and BPB are made on the finished temp folder, so a crash there leaves nothing
    half-written."""
    import transplant.eval.bpb

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(transplant.eval.bpb, "model_bits_per_byte", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="fvt", output=out,
                              eval_texts={"sample": TEXT})
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_report_is_inside_the_committed_output(tiny_pair, tmp_path):
    out = tmp_path / "out"
    result = transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="fvt", output=out,
                                   eval_texts={"sample": TEXT})
    report = json.loads((out / "report.json").read_text())
    assert report["bits_per_byte"]["sample"]["after"] == pytest.approx(result.bpb_after)
    assert result.seconds > 0 and not any(p.name.startswith(".") for p in out.iterdir())


@pytest.mark.parametrize("method, tokenizer_only", [("fvt", True), ("omp", False), (None, False)])
def test_hub_donor_fetches_weights_only_when_the_method_needs_them(tiny_pair, tmp_path, monkeypatch, method,
                                                                    tokenizer_only):
    from transplant.assets import catalog, sources
    from transplant.errors import TransplantError

    asked = []

    # tests/test_hub.py: which files
    def fake_download(hub_id, spec, *, need_model, tokenizer_only, revision):
        asked.append(tokenizer_only)
        raise TransplantError("offline")

    real_resolve = catalog.resolve_model
    monkeypatch.setattr(catalog, "resolve_model",
                        lambda s: "org/donor" if s == "org/donor" else real_resolve(s))
    monkeypatch.setattr(sources, "_from_hub", fake_download)
    with pytest.raises(TransplantError, match="offline"):
        transplant.transplant(tiny_pair["base_tied"], "org/donor", method=method, output=tmp_path / "out")
    assert asked == [tokenizer_only]
