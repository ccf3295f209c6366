"""Issue 13, item 5: the hub without surprises, with `huggingface_hub` replaced by a local fake (no network).

What is checked is which files are requested: a donor brings its tokenizer, plus only the shard(s) holding its
embeddings for donor methods; a base brings everything; `--revision` reaches every request;
`--trust-remote-code` reaches transformers; offline aliases offer a model only for a model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import transplant
from cli import transplant_main
from transplant.assets import catalog
from transplant.errors import TransplantError


class FakeHub:
    """`list_repo_files` and `hf_hub_download` over local folders, recording every request."""

    def __init__(self, root: Path, repos: dict[str, Path]):
        self.root, self.repos, self.requests, self.listed = root, repos, [], []

    def list_repo_files(self, repo_id, revision=None, **_):
        self.listed.append((repo_id, revision))
        return sorted(p.name for p in self.repos[repo_id].iterdir() if p.is_file())

    def hf_hub_download(self, repo_id, filename, revision=None, **_):
        self.requests.append((repo_id, filename, revision))
        source = self.repos[repo_id] / filename
        if not source.is_file():
            raise FileNotFoundError(f"404: {filename}")
        target = self.root / repo_id.replace("/", "--") / "snapshots" / (revision or "0123abcd") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)

    def files(self, repo_id):
        return {name for repo, name, _ in self.requests if repo == repo_id}


@pytest.fixture
def hub(tiny_pair, tmp_path, monkeypatch):
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "remote" / "donor"  # the donor with its weights in many shards, as big models are
    AutoModelForCausalLM.from_pretrained(tiny_pair["donor_model"]).save_pretrained(sharded,
                                                                                   max_shard_size="60KB")
    for item in tiny_pair["donor_tok"].iterdir():
        shutil.copy(item, sharded / item.name)
    (sharded / "README.md").write_text("model card")
    fake = FakeHub(tmp_path / "hf-cache", {"org/donor": sharded, "org/base": tiny_pair["base_tied"]})
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(catalog, "is_hub_offline", lambda timeout=2.0: False)  # the fake answers
    monkeypatch.setenv("TOKENTRANSPLANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return fake


def _shards(names):
    return {n for n in names if n.endswith(".safetensors")}


def test_tokenizer_only_method_downloads_tokenizer_files_only(hub, tiny_pair, tmp_path):
    transplant.transplant(tiny_pair["base_tied"], "org/donor", method="fvt", output=tmp_path / "out",
                          eval_texts=None)
    got = hub.files("org/donor")
    assert not _shards(got) and "model.safetensors.index.json" not in got and "README.md" not in got
    assert {"tokenizer.json", "tokenizer_config.json"} <= got


@pytest.mark.parametrize("method", [None, "omp"])
def test_donor_method_downloads_only_the_embedding_shards(hub, tiny_pair, tmp_path, method):
    index = json.loads((hub.repos["org/donor"] / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {index["model.embed_tokens.weight"], index["lm_head.weight"]}
    assert len(set(index.values())) > len(wanted)  # the test means something only if some shards stay behind
    result = transplant.transplant(tiny_pair["base_tied"], "org/donor", method=method,
                                   output=tmp_path / "out", eval_texts=None,
                                   options={"k": 4} if method == "omp" else {})
    assert result.method == (method or "fvt-ls")  # with a donor model the default reads donor embeddings too
    got = hub.files("org/donor")
    assert _shards(got) == wanted and "model.safetensors.index.json" in got and "README.md" not in got


def test_base_from_hub_downloads_everything_at_the_revision(hub, tiny_pair, tmp_path):
    transplant.transplant("org/base", tiny_pair["donor_tok"], method="fvt", output=tmp_path / "out",
                          eval_texts=None, revision="v1.0")
    got = hub.files("org/base")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= got
    assert {rev for repo, _, rev in hub.requests if repo == "org/base"} == {"v1.0"}
    assert hub.listed == [("org/base", "v1.0")]


def test_donor_revision_reaches_the_donor_only(hub, tiny_pair, tmp_path):
    runner = CliRunner()
    done = runner.invoke(transplant_main, ["--base", str(tiny_pair["base_tied"]), "--donor", "org/donor",
                                           "--method", "fvt", "--donor-revision", "abc123", "--eval-bytes",
                                           "0", "-o", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert {rev for _, _, rev in hub.requests} == {"abc123"}


def test_revision_for_a_local_path_is_refused(tiny_pair, tmp_path):
    with pytest.raises(TransplantError, match="--revision v2 applies to hub ids only") as info:
        transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="fvt",
                              output=tmp_path / "o", revision="v2")
    assert "\n" not in str(info.value)


def test_trust_remote_code_is_off_by_default_and_passed_through(tiny_pair, tmp_path, monkeypatch):
    import transformers
    from transformers import AutoTokenizer

    donor = tmp_path / "custom-donor"  # only a tokenizer_config.json: a folder only AutoTokenizer can read
    donor.mkdir()
    shutil.copy(tiny_pair["donor_tok"] / "tokenizer_config.json", donor)
    seen = []
    original = AutoTokenizer.from_pretrained

    def recording(spec, *args, **kwargs):  # stands in for a tokenizer class shipped as code
        seen.append(kwargs.get("trust_remote_code"))
        return original(tiny_pair["donor_tok"] if str(spec) == str(donor) else spec, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    runner = CliRunner()
    for flag, expected in (([], False), (["--trust-remote-code"], True)):
        seen.clear()
        out = tmp_path / f"out{len(flag)}"
        done = runner.invoke(transplant_main, ["--base", str(tiny_pair["base_tied"]), "--donor", str(donor),
                                               "--method", "fvt", "--eval-bytes", "0", "-o", str(out), *flag])
        assert done.exit_code == 0, done.output
        assert seen and set(seen) == {expected}


def test_remote_code_refusal_names_the_flag(monkeypatch):
    import transformers

    from transplant.tokenizers.load import load_pretrained

    def refuse(*args, **kwargs):
        raise ValueError("The repository org/x contains custom code which must be executed; set "
                         "trust_remote_code=True")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(TransplantError, match="pass --trust-remote-code"):
        load_pretrained("org/x")


def test_offline_base_alias_never_suggests_a_tokenizer(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    done = runner.invoke(transplant_main,
                         ["--base", "llama", "--donor", "mistral-v3", "-o", str(tmp_path / "o")])
    assert done.exit_code == 2 and done.output.count("\n") == 1
    assert "no offline model stands in for it" in done.output and "'llama3' is" not in done.output
    donor = runner.invoke(transplant_main, ["--base", str(tmp_path / "missing"), "--donor", "llama"])
    assert donor.exit_code == 2
