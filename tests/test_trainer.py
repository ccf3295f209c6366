"""The distillation trainer on tiny models: learning, exact resume (also after SIGKILL, with one and two
processes), several processes (each tokenizing only its own windows), ZeRO-3 for the student and the teacher,
a loss's trainable projection, optimizer offload, autocast, export, LoRA and embeddings-only phases,
recipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.config import load_recipe
from distill.losses import loss_options
from distill.runtime import load_deepspeed_config
from distill.trainer import Trainer
from tests.conftest import BASE_CORPUS
from transplant.errors import TransplantError

REPO = Path(__file__).resolve().parents[1]
ZERO0 = str(REPO / "recipes/deepspeed/zero0_cpu.json")
ZERO3 = str(REPO / "recipes/deepspeed/zero3_cpu_test.json")
OFFLOAD = str(REPO / "recipes/deepspeed/zero2_offload_cpu_test.json")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def make_recipe(tmp_path: Path, tiny_pair, name: str, **sections) -> dict:
    train_file = tmp_path / "train.txt"
    if not train_file.exists():
        train_file.write_text(BASE_CORPUS)
        (tmp_path / "heldout.txt").write_text(BASE_CORPUS[:1200])
    recipe = {
        "output_dir": str(tmp_path / name),
        "teacher": {"path": str(tiny_pair["base_untied"])},
        "student": {"path": str(tiny_pair["donor_model"])},
        "data": {"train": [str(train_file)], "max_length": 48},
        "loss": {"name": "alm"},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 6, "micro_batch_size": 2, "grad_accum": 2, "log_every": 100},
        "eval": {"texts": [], "teacher": False},
        "checkpoint": {"every": 0},
        "deepspeed": ZERO0,
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    return recipe


def run_in_process(recipe: dict, *overrides: str) -> tuple[Trainer, dict]:
    trainer = Trainer(load_recipe(data=recipe, overrides=list(overrides))).setup()
    return trainer, trainer.train()


def run_cli(recipe: dict, tmp_path: Path, *args: str, wait: bool = True):
    path = tmp_path / f"{Path(recipe['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "cli", "distill", str(path), *args]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(output_dir: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def weights(output_dir: str) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_alm_steps_reduce_loss_and_heldout_bpb_and_export_loads(tmp_path, tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "one.txt").write_text(BASE_CORPUS[:150])  # one unpacked document: the same batch every step
    recipe = make_recipe(tmp_path, tiny_pair, "learn", train={"steps": 12, "grad_accum": 1},
                         data={"train": [str(tmp_path / "one.txt")], "max_length": 48, "pack": False},
                         loss={"name": "alm", "options": {"alm": {"diff": "binary_kl"}}}, optim={"lr": 1e-2},
                         eval={"texts": [str(tmp_path / "heldout.txt")], "teacher": True, "every": 6})
    trainer, result = run_in_process(recipe)
    history = [r["loss"] for r in result["history"] if "loss" in r]
    assert len(history) == 12 and history[-1] < 0.5 * history[0]
    evals = [r for r in result["history"] if "eval_bpb_all" in r]
    assert [r["step"] for r in evals] == [0, 6, 12] and "teacher_bpb_all" in evals[0]
    assert all(0 < r["eval_bpb_all"] < 20 for r in evals)
    # The export is a stock HF dir with the student's tokenizer and the trained weights.
    out = result["export"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(tiny_pair["donor_tok"]))
    ids = torch.tensor([tokenizer.encode("The cat sat on the mat.")])
    trainer.engine.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trainer.engine.module(input_ids=ids).logits)


def test_tied_student_exports_once_and_ce_needs_no_teacher(tmp_path, tiny_pair):
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(tmp_path, tiny_pair, "tied", loss={"name": "ce"}, train={"steps": 4},
                         teacher={"path": str(tiny_pair["donor_model"])},
                         student={"path": str(tiny_pair["base_tied"])},
                         eval={"texts": [str(tmp_path / "heldout.txt")], "teacher": False})
    trainer, result = run_in_process(recipe)
    assert trainer.teacher is None  # plain CE: no teacher forward at all
    assert result["history"][-1]["eval_bpb_all"] < result["history"][0]["eval_bpb_all"]
    saved = load_file(Path(result["export"]) / "model.safetensors")
    assert "lm_head.weight" not in saved
    model = AutoModelForCausalLM.from_pretrained(result["export"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"])


def test_stop_and_resume_equals_uninterrupted(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "full", checkpoint={"every": 3, "keep": 1})
    recipe["train"]["steps"] = 8
    run_in_process(recipe)
    resumed = {**recipe, "output_dir": str(tmp_path / "resumed")}
    run_in_process(resumed, "train.stop_after=5")  # steps 4-5 run after the step-3 checkpoint, then are lost
    assert not (tmp_path / "resumed" / "final").exists()
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step_*")] == ["step_00000003"]
    with pytest.raises(TransplantError, match="--resume"):
        run_in_process(resumed)
    run_in_process(resumed, "train.resume=true")
    assert losses(resumed["output_dir"]) == losses(recipe["output_dir"])
    assert [s for s, _ in losses(resumed["output_dir"])] == list(range(1, 9))
    assert_same_weights(weights(resumed["output_dir"]), weights(recipe["output_dir"]))


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "killed", train={"steps": 40, "grad_accum": 1},
                         checkpoint={"every": 2, "keep": 2})
    process = run_cli(recipe, tmp_path, wait=False)
    latest = Path(recipe["output_dir"]) / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.exists() and latest.read_text().strip() >= "step_00000004"):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (Path(recipe["output_dir"]) / "final").exists()
    run_in_process(recipe, "train.resume=true")
    reference = {**recipe, "output_dir": str(tmp_path / "reference")}
    run_in_process(reference)
    assert losses(recipe["output_dir"]) == losses(reference["output_dir"])
    assert_same_weights(weights(recipe["output_dir"]), weights(reference["output_dir"]))


@pytest.mark.parametrize("deepspeed_json", [ZERO0, ZERO3], ids=["zero0", "zero3"])
def test_two_gloo_processes_equal_one_with_accumulation(tmp_path, tiny_pair, deepspeed_json):
    """Each of the 2 ranks packs only its own windows (window index); under ZeRO-3 the teacher is sharded too
    and ALM's hidden-state term trains a projection (teacher 32 wide, student 48), sharded with the
    student."""
    sharded = deepspeed_json == ZERO3
    # ZeRO-3 takes GradMag's norms at the logits (its partitioned block has no full gradient): the one-process
    # reference is asked for the same place
    loss = {"name": "alm", "options": {"alm": {"hidden_weight": 0.5}}, "gradmag_at": "logits"} if sharded \
        else {"name": "alm"}
    one = make_recipe(tmp_path, tiny_pair, "one", train={"steps": 4, "grad_accum": 2}, loss=loss)
    trainer, _ = run_in_process(one)
    assert trainer.loader.index is None  # one rank: no index pass
    two = make_recipe(tmp_path, tiny_pair, "two", train={"steps": 4, "grad_accum": 1}, loss=loss,
                      launch={"nproc_per_node": 2}, deepspeed=deepspeed_json,
                      teacher={"path": str(tiny_pair["base_untied"]),
                               "shard": "zero3" if sharded else "none"})
    run_cli(two, tmp_path)  # relaunches itself under torchrun with 2 gloo processes
    assert (Path(two["output_dir"]) / "window_index.json").is_file()
    for (s1, l1), (s2, l2) in zip(losses(one["output_dir"]), losses(two["output_dir"]), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    assert_same_weights(weights(two["output_dir"]), weights(one["output_dir"]), atol=1e-5)
    if sharded:  # the projection trained but is not part of the exported model
        records = [json.loads(line)
                   for line in (Path(one["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert all(r["hidden_mse"] > 0 for r in records if "loss" in r)
        assert not any("distill_loss_modules" in name for name in weights(two["output_dir"]))
        projection = trainer.engine.module.distill_loss_modules["hidden_projection"]
        assert projection.weight.shape == (32, 48)


def _launch_killable(recipe: dict, tmp_path: Path, *args: str) -> subprocess.Popen:
    """`distill` in its own session, so that SIGKILL reaches torchrun and both workers."""
    path = tmp_path / f"{Path(recipe['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "cli", "distill", str(path), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def test_two_processes_killed_and_resumed_equal_uninterrupted(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "killed2", train={"steps": 30, "grad_accum": 1},
                         checkpoint={"every": 2, "keep": 2}, launch={"nproc_per_node": 2})
    process = _launch_killable(recipe, tmp_path)
    latest = Path(recipe["output_dir"]) / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text().strip() >= "step_00000004"):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (Path(recipe["output_dir"]) / "final").exists()
    run_cli(recipe, tmp_path, "--resume")
    reference = {**recipe, "output_dir": str(tmp_path / "reference2")}
    run_cli(reference, tmp_path)
    assert losses(recipe["output_dir"]) == losses(reference["output_dir"])
    assert_same_weights(weights(recipe["output_dir"]), weights(reference["output_dir"]))


def test_baselines_add_their_published_ce_term(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "uld", train={"steps": 2, "grad_accum": 1},
                         loss={"name": "uld"})
    trainer, result = run_in_process(recipe)
    assert trainer.ce_weight == 1.0  # ULD's paper: CE + 1.5 * ULD
    for record in (r for r in result["history"] if "loss" in r):
        assert record["loss"] == pytest.approx(1.5 * record["uld"] + record["ce_anchor"], rel=1e-5)
    trainer.use_loss("mined")
    assert trainer.ce_weight == 0.9 and "mined_mapping" in trainer.loss_extras
    trainer.use_loss("ce")
    assert trainer.ce_weight == 0.0  # plain SFT: no second CE term
    override = make_recipe(tmp_path, tiny_pair, "uld_no_ce", train={"steps": 1, "grad_accum": 1},
                           loss={"name": "uld", "ce_weight": 0.0})
    _, result = run_in_process(override)
    assert "ce_anchor" not in result["history"][-1]


def test_gradmag_balance_weights_alm_and_ce_by_their_gradients(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "gradmag", train={"steps": 2, "grad_accum": 1},
                         loss={"name": "alm", "gradmag_at": "block"})
    trainer, result = run_in_process(recipe)
    assert (trainer.ce_weight, trainer.balance) == (1.0, "gradmag")  # ALM's published default
    assert trainer.probe is not None and trainer.probe.params  # norms at the last block, the re-run checked
    for record in (r for r in result["history"] if "loss" in r):
        share = record["ce_share"]
        assert 0.0 < share < 1.0
        assert record["loss"] == pytest.approx((1 - share) * record["alm"]
                                               + share * record["ce_anchor"], rel=1e-4)
    bad = make_recipe(tmp_path, tiny_pair, "badbalance", train={"steps": 1},
                      loss={"name": "alm", "balance": "mean"})
    with pytest.raises(TransplantError, match="loss.balance"):
        run_in_process(bad)
    at_logits = make_recipe(tmp_path, tiny_pair, "atlogits", train={"steps": 2, "grad_accum": 1},
                            loss={"name": "alm", "gradmag_at": "logits"})
    trainer2, result2 = run_in_process(at_logits)
    assert trainer2.probe is None
    shares = [(a["ce_share"], b["ce_share"]) for a, b in zip(result["history"], result2["history"])
              if "ce_share" in a]
    # the two places weigh differently
    assert shares and all(a != pytest.approx(b, rel=1e-3) for a, b in shares)


def test_optimizer_offload_config_trains_with_deepspeed_cpu_adam(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "offload", train={"steps": 3, "grad_accum": 1},
                         deepspeed=OFFLOAD)
    trainer, result = run_in_process(recipe)
    assert type(trainer.engine.optimizer.optimizer).__name__ == "DeepSpeedCPUAdam"
    history = [r["loss"] for r in result["history"] if "loss" in r]
    assert len(history) == 3 and all(0 < v < 100 for v in history)
    before, after = load_file(tiny_pair["donor_model"] / "model.safetensors"), weights(recipe["output_dir"])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"],
                           after["model.layers.0.mlp.up_proj.weight"])


def test_bf16_autocast_keeps_fp32_weights(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "autocast",
                         train={"steps": 3, "grad_accum": 1, "autocast": "bf16"})
    trainer, result = run_in_process(recipe)
    assert trainer.ds_config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert all(p.dtype == torch.float32 for p in trainer.engine.module.parameters())
    assert all(0 < r["loss"] < 100 for r in result["history"] if "loss" in r)
    assert weights(recipe["output_dir"])["lm_head.weight"].dtype == torch.float32
    with pytest.raises(TransplantError, match="keeps fp32 weights"):
        Trainer(load_recipe(data=recipe,
                            overrides=["student.dtype=bfloat16", "output_dir=" + str(tmp_path / "x")]))


def test_lora_changes_only_adapted_layers_and_embeddings(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "lora", train={"steps": 3},
                         lora={"enabled": True, "rank": 4, "targets": ["q_proj", "v_proj"]})
    _, result = run_in_process(recipe)
    before, after = load_file(tiny_pair["donor_model"] / "model.safetensors"), weights(recipe["output_dir"])
    assert sorted(before) == sorted(after)  # adapters merged: no lora tensors left
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {n for n in before if n.endswith(("q_proj.weight", "v_proj.weight"))}
    assert changed == expected | {"model.embed_tokens.weight", "lm_head.weight"}


def test_embeddings_only_phase_freezes_the_body(tmp_path, tiny_pair):
    recipe = make_recipe(tmp_path, tiny_pair, "emb", train={"steps": 2, "embeddings_only_steps": 2})
    run_in_process(recipe)
    before, after = load_file(tiny_pair["donor_model"] / "model.safetensors"), weights(recipe["output_dir"])
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}
    recipe = make_recipe(tmp_path, tiny_pair, "emb_then_all", train={"steps": 4, "embeddings_only_steps": 2},
                         optim={"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"})
    _, result = run_in_process(recipe)
    # the body warms up again when it starts (no jump to the full rate); the embeddings keep their schedule
    assert [r["lr_body"] for r in result["history"]] == pytest.approx([0.0, 0.0, 1.5e-3, 3e-3])
    assert [r["lr_embeddings"] for r in result["history"]] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3])
    after = weights(recipe["output_dir"])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"],
                           after["model.layers.0.mlp.up_proj.weight"])


def test_recipe_overrides_interpolation_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: out/x\noptim: {lr: 1e-4}\ncheckpoint: {dir: '${output_dir}/ck'}\n")
    recipe = load_recipe(path, ["output_dir=/tmp/y", "train.steps=7", "loss.options.alm.debias=true",
                                "data.train=[a.txt, b.jsonl]"])
    assert recipe.optim.lr == 1e-4 and isinstance(recipe.optim.lr, float)
    assert recipe.checkpoint.dir == "/tmp/y/ck" and recipe.export.dir == "/tmp/y/final"
    assert recipe.train.steps == 7 and recipe.loss.options == {"alm": {"debias": True}}
    assert recipe.data.train == ["a.txt", "b.jsonl"]
    with pytest.raises(TransplantError, match="unknown recipe key train.stepz"):
        load_recipe(path, ["train.stepz=3"])
    with pytest.raises(TransplantError, match="not a valid int"):
        load_recipe(path, ["train.steps=many"])
    with pytest.raises(TransplantError, match="key=value"):
        load_recipe(path, ["train.steps"])
    # typed and complete: each default from the loss's Option, another loss's block left alone
    assert loss_options("uld", {"alm": {"temperature": 100.0}, "uld": {"top_k": "8"}}) == {
        "temperature": 1.0, "top_k": 8, "weight": 1.5}
    with pytest.raises(TransplantError, match="keyed by loss name"):
        loss_options("alm", {"temperature": 100.0})
    with pytest.raises(TransplantError, match="not an option of loss 'uld'"):
        loss_options("uld", {"uld": {"debias": True}})
    bad = tmp_path / "ds.json"
    bad.write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(TransplantError, match="optimizer"):
        load_deepspeed_config(load_recipe(path, [f"deepspeed={bad}"]), None)


DISTILL_RECIPES = ["cpu_smoke_smollm2_mistral.yaml", "cpu_2proc.yaml", "cpu_gemma3_to_smollm2.yaml",
                   "cpu_smoke_reference_regime.yaml", "llama3_8b_to_mistral_nemo_8gpu_zero3.yaml",
                   "large_to_small_distill.yaml"]


@pytest.mark.parametrize("recipe_path", [REPO / "recipes" / n for n in DISTILL_RECIPES], ids=lambda p: p.name)
def test_shipped_recipes_are_valid_and_documented(recipe_path):
    text = recipe_path.read_text()
    assert text.startswith("#") and "distill " in text.split("\n\n")[0] and "--set" in text
    recipe = load_recipe(recipe_path)
    assert (recipe.checkpoint.dir.startswith(recipe.output_dir)
            and recipe.export.dir.startswith(recipe.output_dir))
    ds = ((recipe_path.parent / recipe.deepspeed) if not Path(recipe.deepspeed).exists()
          else Path(recipe.deepspeed))
    config = json.loads(ds.read_text())
    assert "optimizer" not in config and "scheduler" not in config
    for name in recipe.loss.options:  # every loss block is valid for its loss
        loss_options(name, recipe.loss.options)


def test_self_distillation_transplants_the_student_when_missing_and_reads_chat_jsonl(tmp_path, tiny_pair):
    lines = [json.dumps({"messages": [{"role": "user", "content": "What does add(2, 3) print?"},
                                      {"role": "assistant",
                                       "content": "It prints 5. The quick brown fox."}]}),
             json.dumps({"text": BASE_CORPUS[:400]})]
    (tmp_path / "mix.jsonl").write_text("\n".join(lines * 4))
    student_dir = tmp_path / "transplanted"
    recipe = make_recipe(tmp_path, tiny_pair, "selfdistill", train={"steps": 2},
                         teacher={"path": str(tiny_pair["base_tied"])},
                         student={"path": str(student_dir), "prepare": {"base": str(tiny_pair["base_tied"]),
                                                                       "donor": str(tiny_pair["donor_tok"]),
                                                                       "method": "fvt"}},
                         data={"train": [str(tmp_path / "mix.jsonl")], "max_length": 64})
    _, result = run_in_process(recipe)
    assert (student_dir / "config.json").exists()  # made by transplant() before training
    losses_seen = [r["loss"] for r in result["history"] if "loss" in r]
    assert len(losses_seen) == 2 and all(0 < v < 10 for v in losses_seen)
    assert all(r["num_items"] > 10 for r in result["history"] if "num_items" in r)


def test_teacher_sharded_with_parameter_offload_gives_the_same_run(tmp_path, tiny_pair):
    """teacher.shard=offload: a ZeRO-3 inference engine with the teacher's weights in CPU RAM, gathered layer
    by layer; the forward, and so the run, is the replicated teacher's."""
    replicated = make_recipe(tmp_path, tiny_pair, "teacher_replicated", train={"steps": 2, "grad_accum": 1})
    offloaded = make_recipe(tmp_path, tiny_pair, "teacher_offload", train={"steps": 2, "grad_accum": 1},
                            teacher={"path": str(tiny_pair["base_untied"]), "shard": "offload"})
    _, reference = run_in_process(replicated)
    trainer, result = run_in_process(offloaded)
    assert trainer.teacher_engine is not None and trainer.teacher_engine.zero_optimization_stage() == 3
    assert [r["loss"] for r in result["history"]] == pytest.approx([r["loss"] for r in reference["history"]],
                                                                   rel=1e-6)


def test_the_smoke_recipes_chat_data_is_found_and_apart_from_the_chat_kept_benchmark():
    """The smoke recipe heals on the teacher's own conversations (recipes/data/chat_heal.jsonl, found beside
    the recipe from any working directory); none of its prompts may be one the chat-kept benchmark scores."""
    recipe = load_recipe(REPO / "recipes" / "cpu_smoke_smollm2_mistral.yaml")
    chat_files = [Path(s) for s in recipe.data.train if s.endswith(".jsonl")]
    assert chat_files and all(p.is_file() for p in chat_files)
    prompts = set()
    for path in chat_files:
        for line in path.read_text().splitlines():
            turns = json.loads(line)["messages"]
            assert [t["role"] for t in turns] == ["user", "assistant"] and turns[1]["content"].strip()
            prompts.add(turns[0]["content"])
    benchmark = set(json.loads((REPO / "bench" / "data" / "chat_prompts.json").read_text()))
    assert len(prompts) >= 500 and not prompts & benchmark
