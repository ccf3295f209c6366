"""The shared checkpoint module (`distill.checkpoint`, used by both trainers): what a resume refuses and what
a save may prune. Bad checkpoints on `distill --resume` are one line, exit 2, and leave every checkpoint as it
was (issue 24: a dangling `latest`, a truncated DeepSpeed file, a corrupt trainer.json, nothing to resume
from)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli import distill_main
from distill import checkpoint
from tests.test_trainer import make_recipe, run_in_process
from transplant.errors import TransplantError


def fake_checkpoint(directory: Path, step: int, *, latest: bool = True) -> str:
    tag = checkpoint.tag_for(step)
    (directory / tag).mkdir(parents=True)
    (directory / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (directory / tag / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    if latest:
        (directory / "latest").write_text(tag)
    return tag


def snapshot(directory: Path) -> dict[str, bytes]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def test_prune_waits_for_latest_and_never_deletes_newer_checkpoints(tmp_path):
    for step in (1, 2, 3, 5):
        fake_checkpoint(tmp_path, step, latest=False)
    saved = fake_checkpoint(tmp_path, 4, latest=False)
    (tmp_path / "latest").write_text(checkpoint.tag_for(3))  # the save of step 4 did not complete
    checkpoint.prune(tmp_path, 2, saved)
    assert checkpoint.tags(tmp_path) == [checkpoint.tag_for(s) for s in (1, 2, 3, 4, 5)]
    (tmp_path / "latest").write_text(saved)
    checkpoint.prune(tmp_path, 2, saved)  # keeps step 4 and the newest older one; step 5 is not its to delete
    assert checkpoint.tags(tmp_path) == [checkpoint.tag_for(s) for s in (3, 4, 5)]


def test_check_resume_says_what_is_there(tmp_path, caplog):
    with pytest.raises(TransplantError, match="there is no checkpoint in .* run without --resume"):
        checkpoint.check_resume(tmp_path, True)
    with caplog.at_level(logging.WARNING, logger="distill.checkpoint"):
        assert checkpoint.check_resume(tmp_path, True, missing="warn") is None  # hypernet's `resume: true`
    assert "no checkpoint" in caplog.text
    (tmp_path / checkpoint.tag_for(2)).mkdir()  # a first save killed midway: nothing to resume or guard
    assert checkpoint.check_resume(tmp_path, False) is None
    two = fake_checkpoint(tmp_path, 3, latest=False)
    with pytest.raises(TransplantError, match=f"no `latest` file; valid: {two}; write one of them into"):
        checkpoint.check_resume(tmp_path, True)
    with pytest.raises(TransplantError, match="holds checkpoints of an earlier run; pass --resume"):
        checkpoint.check_resume(tmp_path, False)
    (tmp_path / "latest").write_text("../../etc")
    with pytest.raises(TransplantError, match="which is not a checkpoint tag; valid: step_00000003"):
        checkpoint.check_resume(tmp_path, True)
    (tmp_path / "latest").write_text(two)
    assert checkpoint.check_resume(tmp_path, True) == two


def distill_error(recipe_path: Path, *args: str) -> str:
    """Exit 2 and one line on stderr, no traceback; returns the line."""
    result = CliRunner().invoke(distill_main, [str(recipe_path), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_resume_refuses_a_dangling_latest_a_corrupt_state_and_a_truncated_file(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "run", train={"steps": 6, "stop_after": 4},
                         checkpoint={"every": 2, "keep": 2})
    run_in_process(recipe)
    ckpt = Path(recipe["output_dir"]) / "checkpoints"
    two, four = checkpoint.tag_for(2), checkpoint.tag_for(4)
    path = tmp_path / "heal.yaml"
    path.write_text(yaml.safe_dump({**recipe, "train": {**recipe["train"], "stop_after": 0}}))
    before = snapshot(ckpt)

    (ckpt / "latest").write_text(checkpoint.tag_for(9))  # issue 24 item 4: was a run from step 0 that pruned
    line = distill_error(path, "--resume")
    assert f"names 'step_00000009', which is missing; valid: {two}, {four}; write one of them into" in line
    line = distill_error(path)  # and without --resume, the valid checkpoints are still guarded
    assert "holds checkpoints of an earlier run" in line
    assert snapshot(ckpt) == {**before, "latest": b"step_00000009"}

    (ckpt / "latest").write_text(four)
    (ckpt / four / "trainer.json").write_text("{not json")  # item 10: refused before any model loads
    assert f"names '{four}', which has a corrupt trainer.json" in distill_error(path, "--resume")
    (ckpt / four / "trainer.json").write_bytes(before[f"{four}/trainer.json"])

    states = ckpt / four / "mp_rank_00_model_states.pt"
    states.write_bytes(before[f"{four}/mp_rank_00_model_states.pt"][:2000])  # item 10: truncated
    line = distill_error(path, "--resume")
    assert f"checkpoint file {states} is unreadable, truncated or corrupt" in line and f"valid: {two}" in line
    assert sorted(snapshot(ckpt)) == sorted(before)

    (ckpt / "latest").write_text(two)  # the fix the message names: resume from the earlier one
    _, result = run_in_process(yaml.safe_load(path.read_text()), "train.resume=true")
    assert result["steps"] == 6 and checkpoint.tags(ckpt) == [four, checkpoint.tag_for(6)]


def test_resume_with_no_checkpoint_is_refused_before_any_model_loads(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "fresh", teacher={"path": str(tmp_path / "no-such-teacher")})
    path = tmp_path / "fresh.yaml"
    path.write_text(yaml.safe_dump(recipe))
    line = distill_error(path, "--resume")  # issue 24 item 11: was a silent start from step 0
    assert "--resume: there is no checkpoint in" in line and "run without --resume" in line
    assert not (tmp_path / "fresh").exists()
