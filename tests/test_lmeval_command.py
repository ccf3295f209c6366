"""`transplant eval --tasks` prints and saves the stock `lm_eval` command behind each number, and stock
lm-eval run with that command gives the same number (tiny models from conftest, local tasks, no hub)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import transplant_main
from transplant.eval.lmeval_stock import COMMAND_FILE, StockRun, model_args, stock_command


def test_model_args_spell_out_add_bos_token_and_the_include_path():
    run = StockRun(Path("/m"), ("tt_bpb_code",), False, "float32", "cpu", 8,
                   include_path=Path("/tasks"), limit=3)
    assert model_args(run) == "pretrained=/m,dtype=float32,add_bos_token=False"
    command = stock_command(run)
    assert command.startswith("HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf")
    assert "--include_path /tasks" in command and "--limit 3" in command and "--tasks tt_bpb_code" in command
    default = StockRun(Path("/m"), ("hellaswag",), None, "float32", "cpu", 8, offline=False)
    assert "add_bos_token" not in model_args(default) and not stock_command(default).startswith("HF_")


@pytest.fixture(scope="module")
def evaluated(tiny_pair, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("eval") / "eval"
    result = CliRunner().invoke(transplant_main, ["eval", str(tiny_pair["base_tied"]), "--tasks",
                                                  "tt_bpb_code,tt_mc_small", "--limit", "4", "--device",
                                                  "cpu", "--save-dir", str(save_dir)])
    assert result.exit_code == 0, result.output
    return result.stdout, save_dir  # tqdm bars go to stderr


def test_eval_prints_per_model_progress_and_saves_results_with_the_command(evaluated, tiny_pair):
    output, save_dir = evaluated
    progress = [line for line in output.splitlines() if line.startswith(f"[1/1] {tiny_pair['base_tied']}: ")]
    assert len(progress) == 1 and "tt_bpb_code/bits_per_byte=" in progress[0], output
    lines = (save_dir / COMMAND_FILE).read_text().splitlines()
    assert lines[0].startswith("#")
    bpb, mc = lines[1:]
    assert "add_bos_token=False" in bpb and "--tasks tt_bpb_code" in bpb and "--include_path" in bpb
    assert "--tasks tt_mc_small" in mc and "--limit 4" in mc
    assert f"  stock: {bpb}" in output
    results = json.loads((save_dir / "results.json").read_text())
    assert set(results[str(tiny_pair["base_tied"])]) == {"tt_bpb_code", "tt_mc_small"}
    assert "tt_bpb_code/bits_per_byte" in (save_dir / "results.md").read_text()


@pytest.mark.slow  # the stock CLI indexes every task lm-eval ships before it runs one: minutes on 2 cores
def test_the_saved_command_reproduces_the_number_with_stock_lm_eval(evaluated, tiny_pair, tmp_path):
    _, save_dir = evaluated
    bpb_line = (save_dir / COMMAND_FILE).read_text().splitlines()[1]
    words = shlex.split(bpb_line)
    # the environment a user's shell has: no process-group variables an in-process trainer test left behind
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(dict(word.split("=", 1) for word in words[:2]), OMP_NUM_THREADS="1")
    lm_eval = str(Path(sys.executable).with_name("lm_eval"))
    done = subprocess.run([lm_eval, *words[3:], "--output_path", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    stock = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]["tt_bpb_code"]
    ours = json.loads((save_dir / "results.json").read_text())[str(tiny_pair["base_tied"])]["tt_bpb_code"]
    assert stock["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-6)


def test_an_in_process_run_leaves_no_launch_variables_behind(tiny_pair, tmp_path, monkeypatch):
    """Issue 25: `distill.trainer.run` from Python sets RANK/WORLD_SIZE/MASTER_PORT for its one-process group;
    a stock `lm_eval` (or any subprocess) started afterwards must not inherit them (it would try to bind the
    same port: EADDRINUSE)."""
    import os

    from distill.config import load_recipe
    from distill.trainer import run
    from tests.test_trainer import LAUNCH_VARS, make_recipe

    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    result = run(load_recipe(data=make_recipe(tmp_path, tiny_pair, "env", loss={"name": "ce"},
                                              train={"steps": 1})))
    assert result["steps"] == 1
    assert [var for var in LAUNCH_VARS if var in os.environ] == []
