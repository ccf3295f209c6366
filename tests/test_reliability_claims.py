"""Bad input, round two (issue 24 items 1, 2, 15-17): what a run may claim as its output, and when.

Training (`distill`, `hypernet train`) claims a new, empty or own marked output folder after its inputs are
read (`transplant.io.claim`); a transplant's final rename that loses a race, and a base whose config.json and
embedding disagree, are one line. Each refusal: exit 2, one `error:` line, the scratch folder byte-for-byte
unchanged. Tiny models built in the tests (tests/conftest.py), no network.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import transplant
from cli import distill_main, hypernet_main, transplant_main
from distill.config import load_recipe
from distill.trainer import run as distill_run
from tests.conftest import BASE_CORPUS, DONOR_CORPUS
from tests.test_reliability import assert_user_error, copy_model, edit_config, snapshot
from tests.test_reliability_inputs import earlier_output
from tests.test_trainer import make_recipe
from transplant.assets import load_vocab
from transplant.errors import TransplantError
from transplant.io import atomic
from transplant.io.marker import MARKER, read_marker


def refused(command, args: list[object], tmp: Path, fragment: str) -> str:
    """Invoke, check the one-line refusal and that nothing under `tmp` changed."""
    before = snapshot(tmp)
    line = assert_user_error(CliRunner().invoke(command, [str(a) for a in args]), fragment)
    assert snapshot(tmp) == before, "a refused run wrote or deleted something"
    return line


def recipe_file(tmp_path: Path, recipe: dict, name: str = "heal.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---------------------------------------------------------------- item 2: distill claims only its own folder


def test_distill_refuses_a_folder_of_the_users_own_files(tiny_pair, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # named like ours, written by the user
    (mine / "recipe.yaml").write_text("my notes\n")
    path = recipe_file(tmp_path, make_recipe(tmp_path, tiny_pair, "mine"))
    line = refused(distill_main, [path], tmp_path, "holds files tokentransplant did not write")
    assert str(mine) in line and "choose another output_dir (--set output_dir=DIR)" in line
    refused(distill_main, [path, "--set", f"output_dir={mine}"], tmp_path, "did not write")
    refused(distill_main, [path, "--resume"], tmp_path, "did not write")
    # two processes: judged before the student is built and the workers start (the student here is missing
    # and would be transplanted first: nothing may appear)
    two = make_recipe(tmp_path, tiny_pair, "mine", launch={"nproc_per_node": 2})
    two["student"] = {"path": str(tmp_path / "student"),
                      "prepare": {"base": str(tiny_pair["base_tied"]), "donor": str(tiny_pair["donor_tok"]),
                                  "method": "fvt"}}
    refused(distill_main, [recipe_file(tmp_path, two, "two.yaml")], tmp_path, "did not write")


def test_distill_refuses_a_folder_of_another_command(tiny_pair, tmp_path):
    out = earlier_output(tiny_pair, tmp_path / "model")  # a transplant output: ours, but not a training run
    path = recipe_file(tmp_path, make_recipe(tmp_path, tiny_pair, "model"))
    refused(distill_main, [path], tmp_path, f"output_dir {out} holds a tokentransplant transplant output")


@pytest.mark.parametrize("where", ["teacher", "data file", "data folder"])
def test_distill_output_never_holds_an_input(tiny_pair, tmp_path, where):
    recipe = make_recipe(tmp_path, tiny_pair, "run")
    if where == "teacher":
        teacher = copy_model(tiny_pair, "base_untied", tmp_path / "models" / "teacher")
        recipe["teacher"]["path"], recipe["output_dir"] = str(teacher), str(teacher.parent)
        fragment = f"contains an input of this run ({teacher})"
    elif where == "data file":
        recipe["output_dir"] = str(tmp_path)  # holds train.txt
        fragment = "contains an input of this run"
    else:  # metrics.jsonl written inside a corpus folder would be read as training text next time
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / "a.txt").write_text(BASE_CORPUS)
        recipe["data"]["train"], recipe["output_dir"] = [str(corpus)], str(corpus / "run")
        fragment = f"is inside an input of this run ({corpus})"
    refused(distill_main, [recipe_file(tmp_path, recipe)], tmp_path, fragment)


def test_distill_resumes_its_own_folder_and_one_from_before_markers(tiny_pair, tmp_path):
    recipe = make_recipe(tmp_path, tiny_pair, "run", train={"steps": 4, "grad_accum": 1, "stop_after": 2},
                         checkpoint={"every": 2})
    out = Path(recipe["output_dir"])
    assert distill_run(load_recipe(data=recipe))["steps"] == 2
    assert read_marker(out)["kind"] == "distill"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "recipe.yaml", MARKER]
    path = recipe_file(tmp_path, recipe)
    refused(distill_main, [path], tmp_path, "holds checkpoints of an earlier run; pass --resume")
    (out / MARKER).unlink()  # a run from before markers, recognised by its checkpoints
    result = distill_run(load_recipe(data=recipe, overrides=["train.stop_after=3"]), resume=True)
    assert result["steps"] == 3 and read_marker(out)["kind"] == "distill"
    (out / "thesis.tex").write_text("mine")  # a file the user put there makes it theirs
    refused(distill_main, [path, "--resume"], tmp_path, "did not write (thesis.tex)")
    (out / "thesis.tex").unlink()
    result = distill_run(load_recipe(data=recipe, overrides=["train.stop_after=0"]), resume=True)
    assert result["steps"] == 4 and (out / "final" / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the stop at step 3 saved no checkpoint: resumed from 2, no step twice


# ---------------------------------------------------------------- item 15: validate inputs, then claim


def test_distill_with_bad_data_writes_nothing(tiny_pair, tmp_path):
    recipe = make_recipe(tmp_path, tiny_pair, "run", data={"train": [str(tmp_path / "missing.txt")]})
    refused(distill_main, [recipe_file(tmp_path, recipe)], tmp_path, "missing.txt does not exist")
    assert not (tmp_path / "run").exists()  # no folder, no recipe.yaml


def hypernet_recipe(tiny_pair, tmp_path: Path, corpus: object) -> Path:
    recipe = {"base": str(tiny_pair["base_untied"]), "output_dir": str(tmp_path / "hn"),
              "corpus": str(corpus), "steps": 2, "vocab_size": [300, 400], "seq_len": 32,
              "block_bytes": 20000, "model": {"d_model": 32, "layers": 1, "heads": 2}}
    return recipe_file(tmp_path, recipe, "hn.yaml")


@pytest.mark.parametrize("kind, fragment", [("missing", "does not exist"), ("empty", "has no text"),
                                            ("binary", "is not UTF-8 text")])
def test_hypernet_with_a_bad_corpus_claims_nothing(tiny_pair, tmp_path, kind, fragment):
    corpus = tmp_path / "corpus.txt"
    if kind == "empty":
        corpus.write_text("")
    elif kind == "binary":
        corpus.write_bytes(bytes(range(128, 256)) * 200)
    path = hypernet_recipe(tiny_pair, tmp_path, corpus)
    refused(hypernet_main, ["train", path], tmp_path, fragment)
    assert not (tmp_path / "hn").exists()


def test_hypernet_refuses_an_output_holding_its_corpus(tiny_pair, tmp_path):
    corpus = tmp_path / "work" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text(BASE_CORPUS + DONOR_CORPUS)
    path = hypernet_recipe(tiny_pair, tmp_path, corpus)
    refused(hypernet_main, ["train", path, "--set", f"output_dir={corpus.parent}"], tmp_path,
            "contains an input of this run")


# ---------------------------------------------------------------- item 16: config vocab_size vs rows


def test_config_promising_more_rows_than_the_embedding_is_refused(tiny_pair, tmp_path):
    base = copy_model(tiny_pair, "base_tied", tmp_path / "base")
    rows = json.loads((base / "config.json").read_text())["vocab_size"]
    edit_config(base, vocab_size=rows + 8)
    args = ["--base", base, "--donor", tiny_pair["donor_tok"], "--method", "fvt", "-o", tmp_path / "out"]
    line = refused(transplant_main, args, tmp_path, f"says vocab_size={rows + 8} but the embedding")
    assert f"has only {rows} rows; fix config.json or re-download the model" in line


def test_embedding_padded_past_the_config_is_a_warning(tiny_pair, tmp_path, caplog):
    base = copy_model(tiny_pair, "base_tied", tmp_path / "base")
    rows = json.loads((base / "config.json").read_text())["vocab_size"]
    edit_config(base, vocab_size=rows - 8)
    args = ["--base", base, "--donor", tiny_pair["donor_tok"], "--method", "fvt", "--eval-bytes", "2000",
            "-o", tmp_path / "out"]
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(transplant_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    said = f"says vocab_size={rows - 8} but the embedding model.embed_tokens.weight has {rows} rows"
    assert said in caplog.text
    assert "the 8 rows beyond are taken as padding" in caplog.text
    assert "so bits per byte is skipped" in caplog.text  # transformers cannot load such a base to compare
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["vocab_size"] == len(load_vocab(tiny_pair["donor_tok"]))


# ---------------------------------------------------------------- item 17: the final rename race


def test_losing_the_final_rename_is_one_line_and_leaves_the_winner(tiny_pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = atomic._move_into_place

    def winner_lands_first(tmp, path, existed):  # after our last check, before our rename
        out.mkdir()
        (out / "model.safetensors").write_text("the winner's weights")
        real(tmp, path, existed)

    monkeypatch.setattr(atomic, "_move_into_place", winner_lands_first)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(transplant_main, ["--base", str(tiny_pair["base_tied"]), "--donor",
                                                  str(tiny_pair["donor_tok"]), "--method", "fvt",
                                                  "--eval-bytes", "0", "-o", str(out)])
    line = assert_user_error(result, f"another run wrote {out} meanwhile")
    assert "rerun with another --output" in line
    winner = hashlib.sha1(b"the winner's weights").hexdigest()
    # the winner's folder as it wrote it, nothing else changed, no temp folder of ours left
    assert snapshot(tmp_path) == {**before, "out": "dir", "out/model.safetensors": winner}


def test_losing_a_single_file_rename_is_one_line(tmp_path, monkeypatch):
    target = tmp_path / "m.gguf"
    real = atomic.check_file_output

    def folder_made_meanwhile(path, **kwargs):
        found = real(path, **kwargs)
        if "estimate_bytes" not in kwargs:  # the check right before the rename
            target.mkdir()
        return found

    monkeypatch.setattr(atomic, "check_file_output", folder_made_meanwhile)
    with pytest.raises(TransplantError, match="another run wrote .*m.gguf meanwhile"):
        with atomic.atomic_file(target) as tmp:
            tmp.write_bytes(b"GGUF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"] and target.is_dir()


# ---------------------------------------------------------------- item 1: the Python API protects options


def test_api_protects_paths_given_as_options(tiny_pair, tmp_path):
    trained = earlier_output(tiny_pair, tmp_path / "hn")  # any folder of ours: it must survive as it is
    corpus = tmp_path / "work" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text(BASE_CORPUS * 4)
    before = snapshot(tmp_path)
    with pytest.raises(TransplantError, match="is an input of this run"):  # the lost hypernetwork
        transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_tok"], method="hypernet",
                              output=trained, overwrite=True, options={"hypernet": str(trained)})
    with pytest.raises(TransplantError, match="contains an input of this run"):
        transplant.transplant(tiny_pair["base_tied"], tiny_pair["donor_model"], method="focus",
                              output=corpus.parent, overwrite=True, options={"corpus": str(corpus)})
    assert snapshot(tmp_path) == before
