"""`--push-to-hub REPO_ID [--private]` (issue 25): the finished output folder goes to the hub client in one
upload; offline it is one line before any work. The hub client is a recording stand-in (no network)."""

from __future__ import annotations

import huggingface_hub
import pytest
from click.testing import CliRunner

from cli import transplant_main
from transplant.assets import catalog


class RecordingHub:
    """Stands in for `huggingface_hub.HfApi`: records each call and what the folder held at upload time."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path, **kwargs):
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", {"folder_path": folder_path, "files": files, **kwargs}))
        return type("Info", (), {"commit_url": f"https://hub.test/{kwargs['repo_id']}/commit/1"})()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    RecordingHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    monkeypatch.setattr(catalog, "is_hub_offline", lambda timeout=2.0: False)
    monkeypatch.chdir(tmp_path)
    return RecordingHub


@pytest.mark.parametrize("private", [False, True])
def test_transplant_pushes_the_finished_folder(hub, tiny_pair, tmp_path, private):
    out = tmp_path / "out"
    args = ["--base", str(tiny_pair["base_tied"]), "--donor", str(tiny_pair["donor_tok"]), "--method", "fvt",
            "-o", str(out), "--eval-bytes", "0", "--push-to-hub",
            "me/tiny"] + (["--private"] if private else [])
    done = CliRunner().invoke(transplant_main, args)
    assert done.exit_code == 0, done.output
    (create, created), (upload, uploaded) = hub.calls
    assert create == "create_repo" and created == {"repo_id": "me/tiny", "private": private, "exist_ok": True,
                                                   "repo_type": "model"}
    assert (upload == "upload_folder" and uploaded["folder_path"] == str(out)
            and uploaded["repo_id"] == "me/tiny")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(uploaded["files"])
    assert "pushed: https://hub.test/me/tiny/commit/1" in done.output


def test_extend_pushes_too(hub, tiny_pair, tmp_path):
    out = tmp_path / "ext"
    done = CliRunner().invoke(transplant_main, ["extend", str(tiny_pair["base_tied"]), "--token", " zebra",
                                                "-o", str(out), "--push-to-hub", "me/ext"])
    assert done.exit_code == 0, done.output
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[1][1]["folder_path"] == str(out)


def test_offline_push_is_one_line_before_any_work(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    done = CliRunner().invoke(transplant_main, ["--base", str(tiny_pair["base_tied"]), "--donor",
                                                str(tiny_pair["donor_tok"]), "-o", str(out), "--push-to-hub",
                                                "me/tiny"])
    assert done.exit_code == 2 and not out.exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0] and "hf upload me/tiny" in lines[0]
    bad = CliRunner().invoke(transplant_main, ["extend", str(tiny_pair["base_tied"]), "--token", " x",
                                               "--push-to-hub", "not a repo"])
    assert bad.exit_code == 2 and "not a hub repo id" in bad.stderr


def test_distill_pushes_its_export_and_refuses_before_training(hub, tiny_pair, tmp_path, monkeypatch):
    """distill's export goes up too; with no export to push, or offline, one line before any model loads."""
    import yaml

    from cli import distill_main
    from tests.test_trainer import make_recipe

    recipe = make_recipe(tmp_path, tiny_pair, "heal", loss={"name": "ce"}, train={"steps": 2},
                         export={"enabled": True})
    path = tmp_path / "heal.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = CliRunner().invoke(distill_main, [str(path), "--push-to-hub", "me/healed", "--private"])
    assert done.exit_code == 0, done.output
    (_, created), (_, uploaded) = hub.calls
    assert created["private"] is True and uploaded["repo_id"] == "me/healed"
    assert uploaded["folder_path"] == str(tmp_path / "heal" / "final")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(uploaded["files"])
    no_export = CliRunner().invoke(distill_main, [str(path), "--set", "export.enabled=false", "--set",
                                                  f"output_dir={tmp_path / 'other'}",
                                                  "--push-to-hub", "me/x"])
    assert no_export.exit_code == 2 and "export.enabled=false" in no_export.stderr
    assert not (tmp_path / "other").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(catalog, "is_hub_offline", lambda timeout=2.0: True)
    offline = CliRunner().invoke(distill_main, [str(path), "--set", f"output_dir={tmp_path / 'off'}",
                                                "--push-to-hub", "me/x"])
    assert offline.exit_code == 2 and len(offline.stderr.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE is set" in offline.stderr
    assert not (tmp_path / "off").exists()
