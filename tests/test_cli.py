"""The three command lines in one style: `--set` everywhere, one-line user errors (exit 2), help on
everything, and an initializer registered from this test module that runs through `transplant` like a built-in
one."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

from cli import distill_main, hypernet_main, main, transplant_main
from cli_helpers import DEVICE, UserError, one_line, read_text_file
from distill.losses import available_losses
from transplant.errors import TransplantError
from transplant.init import registry
from transplant.init.base import InitContext, InitPlan, copy_shared, sparse_rows
from transplant.io.surgery import read_embeddings

COMMANDS = {"transplant": transplant_main, "distill": distill_main, "hypernet": hypernet_main}
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd"


def run(command: click.Command, *args: object):
    return CliRunner().invoke(command, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, one line on stderr starting `error:`, no traceback; returns the line."""
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, TransplantError)  # handled, not escaped
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def distill_recipe(tmp_path) -> Path:
    path = tmp_path / "heal.yaml"
    path.write_text("output_dir: out/x\ntrain: {steps: 5}\n")
    return path


@pytest.fixture
def hypernet_recipe(tmp_path) -> Path:
    path = tmp_path / "hn.yaml"
    path.write_text("output_dir: out/hn\nsteps: 5\nmodel: {layers: 1}\n")
    return path


# ---------------------------------------------------------------- --set: one syntax, unknown keys rejected


def test_unknown_set_key_on_each_command(tiny_pair, tmp_path, distill_recipe, hypernet_recipe):
    result = run(transplant_main, "--base", tiny_pair["base_tied"], "--donor", tiny_pair["donor_tok"],
                 "--method", "fvt", "--set", "kk=3", "-o", tmp_path / "o")
    assert_user_error(result, "unknown option kk for method 'fvt'", "valid options: numbers")
    assert not (tmp_path / "o").exists()
    result = run(distill_main, distill_recipe, "--set", "train.stepz=3")
    assert_user_error(result, "unknown recipe key train.stepz",
                      "valid keys in train: steps, micro_batch_size")
    result = run(hypernet_main, "train", hypernet_recipe, "--set", "model.layerz=3")
    assert_user_error(result, "unknown recipe key model.layerz",
                      "valid keys in model: d_model, layers, heads")


def test_bad_set_values_are_one_line(tiny_pair, tmp_path, distill_recipe, hypernet_recipe):
    result = run(transplant_main, "--base", tiny_pair["base_tied"], "--donor", tiny_pair["donor_tok"],
                 "--method", "fvt", "--set", "numbers=maybe", "-o", tmp_path / "o")
    assert_user_error(result, "--set numbers=maybe", "numbers (bool, default None)")
    assert_user_error(run(distill_main, distill_recipe, "--set", "train.steps=many"),
                      "recipe key train.steps='many' is not a valid int")
    assert_user_error(run(hypernet_main, "train", hypernet_recipe, "--set", "lr=fast"),
                      "recipe key lr='fast' is not a valid float")
    assert_user_error(run(distill_main, distill_recipe, "--set", "train.steps"), "is not key=value")


def test_bad_yaml_and_unreadable_recipes_are_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("output_dir: out/x\ntrain:\n  steps: 3\n   micro_batch_size: [\n")
    assert_user_error(run(distill_main, broken), f"recipe {broken} line 4:", "fix the YAML")
    assert_user_error(run(hypernet_main, "train", broken), f"recipe {broken} line 4:", "fix the YAML")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(BINARY)
    assert_user_error(run(distill_main, binary), "is not UTF-8 text")
    assert_user_error(run(hypernet_main, "train", tmp_path / "missing.yaml"), "does not exist")


def test_print_recipe_shows_the_resolved_recipe(distill_recipe, hypernet_recipe):
    result = run(distill_main, distill_recipe, "--set", "train.steps=7", "--resume", "--print-recipe")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["steps"] == 7 and printed["train"]["resume"] is True
    assert printed["checkpoint"]["dir"] == "out/x/checkpoints"
    result = run(hypernet_main, "train", hypernet_recipe, "--set", "corpus.english=1000", "--print-recipe")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["corpus"] == {"english": 1000, "code": 100000} and printed["model"]["layers"] == 1


def test_module_entry_runs_each_command_as_launchers_call_it(distill_recipe, hypernet_recipe, monkeypatch):
    """`python -m cli distill ...` is what torchrun -m and deepspeed --module run; deepspeed puts
    --local_rank=N before the command name, and the runtime reads it as LOCAL_RANK."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    result = run(main, "--local_rank=3", "distill", distill_recipe, "--set", "train.steps=7",
                 "--print-recipe")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["train"]["steps"] == 7
    import os

    assert os.environ.pop("LOCAL_RANK") == "3"
    result = run(main, "hypernet", "train", hypernet_recipe, "--print-recipe")
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["model"]["layers"] == 1
    assert_user_error(run(main, "distill", distill_recipe, "--set", "train.stepz=3"), "train.stepz")


# ---------------------------------------------------------------- help and discovery


def test_distill_help_lists_the_losses():
    result = run(distill_main, "--help")
    assert result.exit_code == 0
    losses = result.output.split("Losses")[1]
    assert available_losses() and all(name in losses for name in available_losses())


def test_hypernet_help_lists_train_and_apply_is_gone():
    result = run(hypernet_main, "--help")
    assert result.exit_code == 0 and "train" in result.output.split("Commands:")[1]
    assert "--method hypernet --set hypernet=DIR" in " ".join(result.output.split())
    assert_user_error(run(hypernet_main, "apply", "a", "b", "c"),
                      "No such command 'apply'; see hypernet --help")


def test_click_usage_errors_and_old_bare_overrides_are_one_line(distill_recipe, hypernet_recipe):
    assert_user_error(run(hypernet_main, "train", hypernet_recipe, "steps=3"),
                      "unexpected argument 'steps=3'; write it as --set steps=3")
    assert_user_error(run(distill_main, distill_recipe, "extra.yaml"), "unexpected argument 'extra.yaml'")
    assert_user_error(run(distill_main), "Missing argument 'RECIPE'; see distill --help")
    assert_user_error(run(transplant_main, "methods", "--fast"),
                      "No such option '--fast'; see transplant methods --help")
    assert_user_error(run(transplant_main, "--dtype", "f8"), "Invalid value for '--dtype'")


def test_transplant_methods_shows_summaries_donor_needs_and_options():
    result = run(transplant_main, "methods")
    assert result.exit_code == 0, result.output
    blocks = {block.split(" ", 1)[0].rstrip(":"): block for block in result.output.strip().split("\n\n")}
    assert set(registry.available_methods()) <= set(blocks)
    assert ("needs a donor model" in blocks["omp"]
            and "--set k (int in [1, 4096], default 64)" in blocks["omp"])
    assert "needs only the donor's tokenizer" in blocks["fvt"] and "--set numbers (bool" in blocks["fvt"]
    assert "Fast Vocabulary Transfer" in blocks["fvt"]
    assert_user_error(run(transplant_main, "methods", "nope"), "unknown method 'nope'")


def _all_commands(command: click.Command, path: str = ""):
    yield path or command.name, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _all_commands(sub, f"{path or command.name} {name}")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_option_and_argument_has_help(name):
    for path, command in _all_commands(COMMANDS[name]):
        assert command.help, f"{path} has no help"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{path} {param.opts[0]} has no help"
            else:  # click arguments carry no help of their own: the command's text names them
                assert param.name.upper() in command.help, f"{path} does not explain {param.name.upper()}"
        result = run(COMMANDS[name], *path.split()[1:], "--help")
        assert result.exit_code == 0, (path, result.output)


# ---------------------------------------------------------------- the error handler and --device


def test_undecodable_text_files_are_user_errors(tiny_pair, tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(BINARY)
    assert_user_error(run(transplant_main, "eval", tiny_pair["base_tied"], "--text", binary),
                      f"text file {binary} is not UTF-8 text", "pass a UTF-8 text file")
    assert_user_error(run(transplant_main, "extend", tiny_pair["base_tied"], "--corpus", binary, "-n", "3",
                          "-o", tmp_path / "ext"), "is not UTF-8 text")
    with pytest.raises(TransplantError, match=f"cannot read text file {tmp_path}: .*; pass a readable file"):
        read_text_file(tmp_path)  # a directory


def test_the_handler_makes_any_message_one_line():
    assert one_line("first\n  second\n") == "first second"
    assert one_line("") and "\n" not in one_line(ValueError("a\nb"))
    assert UserError("x").exit_code == 2


def test_device_is_checked_before_anything_loads():
    assert DEVICE.convert("CPU", None, None) == "cpu"
    assert DEVICE.convert("auto", None, None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TransplantError, match="not a device; use cpu, cuda, cuda:N, mps or auto"):
        DEVICE.convert("gpu0", None, None)
    with pytest.raises(TransplantError, match="cuda:99"):
        DEVICE.convert("cuda:99", None, None)
    result = run(transplant_main, "--base", "x", "--donor", "y", "--device", "cuda")
    if torch.cuda.is_available():
        assert "--device" not in result.output
    else:
        assert_user_error(result, "--device cuda: this torch build sees no CUDA GPU",
                          "use --device cpu or auto")
    assert_user_error(run(transplant_main, "eval", "x", "--device", "tpu"), "--device tpu: not a device")


# ---------------------------------------------------------------- adding an initializer is one new file

THROWAWAY = "test-throwaway"
SEEN: dict[str, object] = {}


def throwaway_init(ctx: InitContext) -> InitPlan:
    """`test-throwaway`: shared tokens copied, every new token `scale` times one shared token's row."""
    rows, cols, vals = copy_shared(ctx.alignment, len(ctx.base_vocab))
    anchor = int(ctx.alignment.new_to_base[ctx.alignment.shared_new_ids[-1]])
    new_ids = ctx.alignment.unshared_new_ids.tolist()
    SEEN.update(anchor=anchor, new_ids=new_ids, scale=ctx.options["scale"])
    rows += new_ids
    cols += [anchor] * len(new_ids)
    vals += [ctx.options["scale"]] * len(new_ids)
    return InitPlan(sparse_rows(rows, cols, vals, (len(ctx.new_vocab), len(ctx.base_vocab))))


@pytest.fixture
def throwaway_method():
    option = registry.Option("scale", float, 1.0, "factor on the anchor row", min=0.0, max=10.0)
    registry.register(THROWAWAY, options=(option,))(throwaway_init)
    yield THROWAWAY
    registry.METHODS.pop(THROWAWAY)


def test_an_initializer_registered_here_runs_through_the_cli(tiny_pair, tmp_path, throwaway_method):
    listed = run(transplant_main, "methods", throwaway_method)
    assert "--set scale (float in [0.0, 10.0], default 1.0): factor on the anchor row" in listed.output
    base = [str(tiny_pair["base_tied"]), "--donor", str(tiny_pair["donor_tok"]), "--method", throwaway_method]
    result = run(transplant_main, "--base", *base, "--set", "scale=0.5", "--set", "numbers=off",
                 "--set", "dedup_cosine=1", "-o", tmp_path / "o", "--eval-bytes",
                 "0")  # its rows copy one row
    assert result.exit_code == 0, result.output
    assert f"with {throwaway_method}" in result.output and SEEN["scale"] == 0.5
    new_rows, base_rows = read_embeddings(tmp_path / "o").input, read_embeddings(tiny_pair["base_tied"]).input
    new_id = SEEN["new_ids"][0]
    assert torch.allclose(new_rows[new_id].float(), 0.5 * base_rows[SEEN["anchor"]].float())
    # its options are validated like a built-in method's
    assert_user_error(run(transplant_main, "--base", *base, "--set", "scale=11", "-o", tmp_path / "p"),
                      "--set scale=11: out of range", "scale (float in [0.0, 10.0]")
    assert_user_error(run(transplant_main, "--base", *base, "--set", "scal=1", "-o", tmp_path / "p"),
                      "unknown option scal", "valid options: scale, numbers")
    assert not (tmp_path / "p").exists()


def test_trust_remote_code_reaches_the_eval_loaders_only_when_passed(tiny_pair, tmp_path, monkeypatch):
    import transformers

    seen: list[bool] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. " * 4)
    for flags, expected in (([], False), (["--trust-remote-code"], True)):
        seen.clear()
        result = CliRunner().invoke(transplant_main, ["eval", str(tiny_pair["base_tied"]), *flags, "--text",
                                                      str(text), "--max-length", "16"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert seen and set(seen) == {expected}
