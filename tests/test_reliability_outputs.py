"""What must work where the bad-input matrix (tests/test_reliability.py) must fail: overwriting only our own
outputs, cleanup after SIGTERM and SIGKILL, normal permissions, checks before solving, honest bits per byte,
and a resume that never runs code planted in a checkpoint. Tiny models built in the tests, no network."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from tokenizers import normalizers

import transplant
from cli import transplant_main
from tests.test_reliability import CORPUS, assert_user_error, unk_tokenizer
from transplant.errors import TransplantError
from transplant.eval.bpb import bits_per_byte, load_for_eval, measure_bits_per_byte
from transplant.io import atomic, surgery
from transplant.io import memory as memory_check

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")



def cli_transplant(pair: dict, out: Path, *extra: object):
    args = ["--base", pair["base_tied"], "--donor", pair["donor_tok"], "--method", "fvt", "--eval-bytes", "0",
            "-o", out, *extra]
    return CliRunner().invoke(transplant_main, [str(a) for a in args])


def test_overwrite_replaces_an_empty_folder_and_an_earlier_output(tiny_pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert cli_transplant(tiny_pair, out, "--overwrite").exit_code == 0
    marker = atomic.read_marker(out)
    assert marker and marker["kind"] == "transplant" and "model.safetensors" in marker["files"]
    first = (out / "model.safetensors").stat().st_ino
    result = cli_transplant(tiny_pair, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_get_normal_permissions(tiny_pair, tmp_path):
    previous = os.umask(0o022)
    try:
        assert cli_transplant(tiny_pair, tmp_path / "out").exit_code == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == 0o644


def test_home_and_root_are_never_replaced(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for target, fragment in ((home, "home directory"), (Path("/"), "filesystem root"),
                             (tmp_path, "home directory")):
        with pytest.raises(atomic.TransplantError, match=fragment):
            atomic.check_output(target, overwrite=True)


def test_unwritable_output_fails_before_any_solving(tiny_pair, tmp_path, monkeypatch):
    import transplant.pipeline as pipeline

    def solved(*args, **kwargs):
        raise AssertionError("solved before checking the output")

    monkeypatch.setattr(pipeline, "new_embeddings", solved)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    assert_user_error(cli_transplant(tiny_pair, tmp_path / "out"), "disk full: writing")


def test_free_space_estimate_matches_what_is_written(tiny_pair, tmp_path):
    assert cli_transplant(tiny_pair, tmp_path / "out").exit_code == 0
    rows = json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"]
    estimate = surgery.estimate_output_bytes(tiny_pair["base_tied"], rows) - 16 * 2**20
    written = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert estimate <= written <= estimate + 16 * 1024  # the difference is the header


def test_memory_check_refuses_before_allocating(monkeypatch):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device="cpu": 8 << 30)
    memory_check.check_fits(1 << 30, what="small", fix="-")
    need = memory_check.omp_bytes(200_000, 46_000, 576, 100_000_000)
    with pytest.raises(memory_check.TransplantError,
                       match=r"OMP at k=100000000 needs .* GiB but cpu has 8.0 GiB"):
        memory_check.check_fits(need, what="OMP at k=100000000", fix="use a smaller --set k")


# ---------------------------------------------------------------- temp dirs: SIGTERM, SIGKILL, the next run

WRITER = """
import sys, time
from pathlib import Path
from transplant.io.atomic import atomic_output
with atomic_output(sys.argv[1]) as tmp:
    (tmp / "weights.bin").write_bytes(b"w" * 100_000)
    Path(sys.argv[2]).touch()
    time.sleep(120)
"""


def interrupted_writer(tmp_path: Path, sig: int) -> int:
    """Start a process writing tmp_path/out/out, signal it mid-write; return its exit status."""
    (tmp_path / "out").mkdir()
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "out" / "out"),
                                str(ready)], env=env)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(sig)
    return process.wait(timeout=60)


def test_sigterm_mid_write_removes_the_temp_dir(tmp_path):
    assert interrupted_writer(tmp_path, signal.SIGTERM) == -signal.SIGTERM
    assert list((tmp_path / "out").iterdir()) == []


def test_sigkill_leftover_is_swept_by_the_next_run(tmp_path):
    assert interrupted_writer(tmp_path, signal.SIGKILL) == -signal.SIGKILL
    [leftover] = (tmp_path / "out").iterdir()
    assert leftover.name.startswith(".out.tmp-") and (leftover / "weights.bin").exists()
    atomic.check_output(tmp_path / "out" / "out", overwrite=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_sweep_keeps_live_writers_and_restores_an_interrupted_replacement(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tmp_path / f".a.tmp-{atomic._HOST}-{os.getpid()}-0001"
    stale = tmp_path / f".a.tmp-{atomic._HOST}-{dead.pid}-0002"
    moved_aside = tmp_path / f".b.old-{atomic._HOST}-{dead.pid}-0003"
    other_host = tmp_path / f".c.tmp-ffffff-{dead.pid}-0004"
    for folder in (live, stale, moved_aside, other_host):
        folder.mkdir()
        (folder / "f").write_text("x")
    assert atomic.sweep_stale(tmp_path) == [stale]
    assert live.exists() and other_host.exists() and (tmp_path / "b" / "f").exists()


# ---------------------------------------------------------------- honest bits per byte


def test_lossy_donor_cannot_report_a_better_bpb(tiny_pair, tmp_path):
    donor = unk_tokenizer(tmp_path / "unk")
    result = transplant.transplant(tiny_pair["base_tied"], donor, method="fvt", output=tmp_path / "out",
                                   eval_texts={"english": CORPUS})
    assert result.bpb_before is None and result.bpb_after is None
    assert (result.stats["new_tokenizer_unknown_tokens"] > 0.5
            and result.stats["new_tokenizer_bytes_lost"] > 0.5)
    assert "does not reproduce the held-out text" in result.stats["warning"]
    assert result.extra["report"]["bits_per_byte"] == {}
    model, tokenizer = load_for_eval(tmp_path / "out")
    with pytest.raises(TransplantError, match="does not reproduce the text"):
        bits_per_byte(model, tokenizer, CORPUS)


def test_lossless_donor_reports_zero_loss_and_a_score(tiny_pair, tmp_path):
    result = transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="fvt",
                                   output=tmp_path / "out", eval_texts={"english": CORPUS})
    assert result.stats["new_tokenizer_bytes_lost"] == 0 and result.stats["new_tokenizer_unknown_tokens"] == 0
    assert "warning" not in result.stats and result.bpb_after > 0


@pytest.mark.parametrize("normalizer, lost", [(normalizers.NFKC(), 3), (normalizers.Lowercase(), None)])
def test_normalising_tokenizer_is_scored_on_the_original_bytes(tiny_pair, normalizer, lost):
    model, tokenizer = load_for_eval(tiny_pair["base_tied"])
    tokenizer.backend_tokenizer.normalizer = normalizer
    text = CORPUS * 2 + "a \ufb01ne ligature\n"  # NFKC folds the 3-byte "ﬁ" into "fi": 3 of ~5600 bytes lost
    if lost is None:  # lower-casing loses ~2% of the bytes: refused
        with pytest.raises(TransplantError, match="does not reproduce"):
            measure_bits_per_byte(model, tokenizer, text)
        return
    measured = measure_bits_per_byte(model, tokenizer, text)
    assert measured.fidelity.lost_bytes == lost and measured.fidelity.text_bytes == len(text.encode())
    assert measured.as_dict()["bytes_lost"] == pytest.approx(lost / len(text.encode()))


def test_empty_text_is_an_error(tiny_pair):
    model, tokenizer = load_for_eval(tiny_pair["base_tied"])
    with pytest.raises(TransplantError, match="empty"):
        bits_per_byte(model, tokenizer, "")


# ---------------------------------------------------------------- trusted resume


class Payload:
    """Unpickling this runs code: what a tampered checkpoint would carry."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return exec, (f"open({self.target!r}, 'w').write('pwned')",)


def plant(path: Path, target: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["extra"] = Payload(target)
    torch.save(state, path)


def test_weights_only_load_refuses_a_payload(tmp_path):
    from distill.checkpoint import weights_only_load

    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(weights_only_load(tmp_path / "ok.pt")["w"], torch.ones(2))
    plant(tmp_path / "ok.pt", tmp_path / "ran")
    shutil.copy(tmp_path / "ok.pt", tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)  # the payload is live: full unpickling runs it
    assert (tmp_path / "ran").read_text() == "pwned"
    (tmp_path / "ran").unlink()
    with pytest.raises(TransplantError, match="holds more than weights.*delete that checkpoint"):
        weights_only_load(tmp_path / "ok.pt")
    assert not (tmp_path / "ran").exists()


def test_tampered_checkpoint_does_not_run_on_resume(tiny_pair, tmp_path):
    from distill.config import load_recipe
    from distill.trainer import Trainer

    (tmp_path / "train.txt").write_text(CORPUS)
    recipe = {
        "output_dir": str(tmp_path / "run"), "teacher": {"path": str(tiny_pair["base_untied"])},
        "student": {"path": str(tiny_pair["donor_model"])}, "loss": {"name": "alm"},
        "data": {"train": [str(tmp_path / "train.txt")], "max_length": 48},
        "train": {"steps": 4, "micro_batch_size": 2, "grad_accum": 1, "stop_after": 2},
        "eval": {"texts": [], "teacher": False}, "checkpoint": {"every": 2},
        "deepspeed": str(REPO / "recipes/deepspeed/zero0_cpu.json"),
    }
    Trainer(load_recipe(data=recipe)).setup().train()
    [states] = (tmp_path / "run" / "checkpoints").glob("step_*/*model_states.pt")
    plant(states, tmp_path / "pwned")
    (tmp_path / "heal.yaml").write_text(yaml.safe_dump({**recipe,
                                                        "train": {**recipe["train"], "stop_after": 0}}))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "cli", "distill", str(tmp_path / "heal.yaml"), "--resume"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert not (tmp_path / "pwned").exists()
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint file") and "holds more than weights" in last
