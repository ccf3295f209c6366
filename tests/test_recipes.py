"""The shared settings layer (transplant.recipes): typed YAML recipes, `--set` assignments, on/off words."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from distill.config import load_recipe as load_distill_recipe
from hypernet.config import HypernetRecipe
from hypernet.config import load_recipe as load_hypernet_recipe
from hypernet.model import HypernetConfig
from transplant.errors import TransplantError
from transplant.recipes import env_flag, load_recipe, parse_assignment, parse_bool, recipe_keys

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup: int | None = None


@dataclass
class Toy:
    output_dir: str = "out/toy"
    steps: int = 10
    verbose: bool = False
    checkpoints: str = "${output_dir}/ck"
    corpus: dict[str, int] | str = field(default_factory=lambda: {"english": 100, "code": 50})
    files: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=lambda: {"keep": 1})
    optim: Optim = field(default_factory=Optim)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str, overrides: list[str] = ()) -> str:
    with pytest.raises(TransplantError) as info:
        load_recipe(Toy, _write(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_values_are_coerced_to_the_declared_types(tmp_path):
    path = _write(tmp_path, "steps: '12'\nverbose: on\noptim: {lr: 1e-4, betas: ['0.8', 0.9], warmup: 3.0}\n"
                            "files: one.txt\ncorpus: notes.txt\n")
    toy = load_recipe(Toy, path)
    assert toy.optim.lr == 1e-4 and isinstance(toy.optim.lr, float)  # PyYAML reads 1e-4 as a string
    assert toy.steps == 12 and toy.verbose is True and toy.optim.warmup == 3
    assert toy.optim.betas == [0.8, 0.9] and toy.files == ["one.txt"]
    assert toy.corpus == "notes.txt"  # `dict | str`: a string stays a path
    assert toy.options == {"keep": 1} and toy.checkpoints == "out/toy/ck"


def test_overrides_are_dotted_typed_and_win_over_the_file(tmp_path):
    path = _write(tmp_path, "output_dir: out/a\noptim: {lr: 0.1}\n")
    toy = load_recipe(Toy, path, ["optim.lr=2e-5", "steps=3", "output_dir=/tmp/b", "files=[a.txt, b.txt]",
                                  "options.extra.depth=2", "optim.warmup=null"])
    assert toy.optim == Optim(lr=2e-5, betas=[0.9, 0.95], warmup=None)
    assert toy.steps == 3 and toy.files == ["a.txt", "b.txt"]
    assert toy.checkpoints == "/tmp/b/ck"  # a default's ${output_dir} follows the override
    assert toy.options == {"keep": 1, "extra": {"depth": 2}}


def test_a_mapping_field_is_one_value_replaced_whole(tmp_path):
    toy = load_recipe(Toy, _write(tmp_path, "corpus: {german: 10}\noptions: {other: 2}\n"))
    assert toy.corpus == {"german": 10} and toy.options == {"other": 2}


def test_interpolation_keeps_types_and_reports_bad_references(tmp_path):
    toy = load_recipe(Toy,
                      _write(tmp_path, "steps: 7\noptim: {warmup: '${steps}'}\nfiles: ['${output_dir}/x']\n"))
    assert toy.optim.warmup == 7 and toy.files == ["out/toy/x"]
    assert "${nothing} names no key" in _error(tmp_path, "checkpoints: '${nothing}/ck'\n")
    assert "circle" in _error(tmp_path, "output_dir: '${checkpoints}'\n")


@pytest.mark.parametrize("text, overrides, expected", [
    ("stepz: 3\n", [], "unknown recipe key stepz; valid keys at the top level: output_dir, steps, verbose"),
    ("optim: {lr: 1, beta: 2}\n", [],
     "unknown recipe key optim.beta; valid keys in optim: lr, betas, warmup"),
    ("", ["optim.lrr=1"], "unknown recipe key optim.lrr; valid keys in optim: lr, betas, warmup"),
    ("", ["steps.value=1"], "steps is a int, not a section; set steps=VALUE instead"),
    ("", ["steps=many"], "recipe key steps='many' is not a valid int; fix the value"),
    ("", ["steps=2.5"], "recipe key steps=2.5 is not a valid int"),
    ("", ["steps=true"], "recipe key steps=True is not a valid int"),
    ("", ["verbose=maybe"], "recipe key verbose='maybe' is not a valid bool"),
    ("", ["optim.betas=[0.9, x]"], "recipe key optim.betas[1]='x' is not a valid float"),
    ("", ["optim=3"], "recipe key optim must be a mapping of its keys (lr, betas, warmup)"),
    ("", ["steps=null"], "recipe key steps may not be null"),
    ("", ["steps"], "is not key=value; write it as --set steps=VALUE"),
])
def test_mistakes_are_one_line_naming_the_key_and_the_fix(tmp_path, text, overrides, expected):
    assert expected in _error(tmp_path, text, overrides)


def test_bad_files_are_one_line(tmp_path):
    message = _error(tmp_path, "steps: 3\n  optim: [\n")
    assert message.endswith("line 2: mapping values are not allowed here; fix the YAML")
    assert "must hold `key: value` lines" in _error(tmp_path, "- a\n- b\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(TransplantError, match="is not UTF-8 text"):
        load_recipe(Toy, binary)
    with pytest.raises(TransplantError, match="does not exist"):
        load_recipe(Toy, tmp_path / "missing.yaml")
    with pytest.raises(TransplantError, match="not a file"):
        load_recipe(Toy, tmp_path)


def test_empty_file_and_data_give_defaults():
    assert load_recipe(Toy) == Toy(checkpoints="out/toy/ck")
    assert load_recipe(Toy, data={"optim": {"lr": "3e-3"}}).optim.lr == 3e-3


def test_recipe_keys_are_what_set_may_name():
    assert recipe_keys(Toy) == ["output_dir", "steps", "verbose", "checkpoints", "corpus", "files", "options",
                                "optim.lr", "optim.betas", "optim.warmup"]


def test_parse_assignment_reads_the_value_as_yaml():
    assert parse_assignment("a.b=3") == ("a.b", 3)
    assert parse_assignment(" k = [1, 2]") == ("k", [1, 2])
    assert parse_assignment("path=out/x=y") == ("path", "out/x=y")
    assert parse_assignment("empty=") == ("empty", "")
    assert parse_assignment("flag=off") == ("flag", False)
    with pytest.raises(TransplantError, match="not key=value"):
        parse_assignment("=3")
    with pytest.raises(TransplantError, match="not valid YAML; quote it"):
        parse_assignment("k=[1, 2")


def test_parse_bool_and_env_flag(monkeypatch):
    assert [parse_bool(w) for w in ("1", "true", "Yes", " on ", True)] == [True] * 5
    assert [parse_bool(w) for w in ("0", "false", "NO", "off", False)] == [False] * 5
    with pytest.raises(ValueError, match="expected one of"):
        parse_bool("ture")
    monkeypatch.setenv("TT_TEST_FLAG", "Yes")
    assert env_flag("TT_TEST_FLAG")
    monkeypatch.setenv("TT_TEST_FLAG", "0")
    assert not env_flag("TT_TEST_FLAG")
    monkeypatch.delenv("TT_TEST_FLAG")
    assert not env_flag("TT_TEST_FLAG")


# ---------------------------------------------------------------- the two trainers' recipes


def test_distill_and_hypernet_share_the_loader(tmp_path):
    path = _write(tmp_path, "output_dir: out/x\n")
    for loader in (load_distill_recipe, load_hypernet_recipe):
        with pytest.raises(TransplantError, match="^unknown recipe key seeed; valid keys at the top level: "):
            loader(path, ["seeed=1"])
    assert load_distill_recipe(path, ["train.steps=4"]).train.steps == 4
    assert load_hypernet_recipe(path, ["model.layers=4"]).model.layers == 4
    assert load_distill_recipe(path).recipe_path == str(path)


def test_hypernet_recipe_defaults_follow_the_model_config():
    """Unset sizes come from the preset (the 2M CPU one by default); the rest from HypernetConfig's
    defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(HypernetConfig)}
    arch = HypernetRecipe().model.architecture(576)
    assert {k: arch[k] for k in ("max_pieces", "pooling", "dropout")} == {
        k: defaults[k] for k in ("max_pieces", "pooling", "dropout")}
    assert arch["d_model"] % arch["heads"] == 0 and arch["layers"] >= 1


@pytest.mark.parametrize("overrides, expected", [
    (["vocab_size=[100]"], "vocab_size=[100] must be [low, high]"),
    (["vocab_size=[500, 100]"], "must be [low, high]"),
    (["lm_every=0"], "lm_every=0 must be at least 1"),
    (["real_prob=1.5"], "real_prob=1.5 must be in [0, 1]"),
])
def test_hypernet_recipe_rejects_values_training_cannot_use(overrides, expected):
    with pytest.raises(TransplantError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_hypernet_recipe(None, overrides)


def test_shipped_hypernet_recipe_is_valid_and_documented():
    path = REPO / "recipes" / "hypernet_smollm2_cpu.yaml"
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and "hypernet train" in header and "--set" in header
    recipe = load_hypernet_recipe(path)
    assert recipe.real_tokenizers == ["gpt2"] and recipe.model.preset == "cpu-2m"
    # every key the file sets is a recipe key (nothing silently ignored)
    flat = yaml.safe_load(path.read_text())
    named = {k if not isinstance(v, dict) or k == "corpus" else f"{k}.{kk}"
             for k, v in flat.items() for kk in (v if isinstance(v, dict) else [None])}
    assert named <= set(recipe_keys(HypernetRecipe))
