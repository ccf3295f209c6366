"""Bad input, round two (issue 24, the transplant side): inputs given through `--set` are protected, a changed
earlier output is not ours to replace, and huge or non-finite values give one short line with nothing written.

Each CLI case runs like the matrix of tests/test_reliability.py: exit 2, one `error:` line, the scratch folder
byte-for-byte unchanged. Tiny models built in the tests (tests/conftest.py), no network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import distill_main, transplant_main
from tests.test_reliability import assert_user_error, snapshot
from transplant import recipes
from transplant.errors import MAX_MESSAGE_CHARS, TransplantError
from transplant.init.registry import parse_options
from transplant.io import atomic, surgery

BIG = "x" * (50 << 20)  # the 50 MB string


def run(command, args: list[object], tmp: Path, fragment: str) -> str:
    """Invoke, check the one-line refusal, and that nothing under `tmp` changed."""
    before = snapshot(tmp)
    result = CliRunner().invoke(command, [str(a) for a in args])
    line = assert_user_error(result, fragment)
    assert len(line) <= MAX_MESSAGE_CHARS + 20, f"{len(line)} characters"
    assert snapshot(tmp) == before, "a failed run wrote or deleted something"
    return line


def earlier_output(pair: dict, out: Path) -> Path:
    args = [
        "--base",
        pair["base_tied"],
        "--donor",
        pair["donor_tok"],
        "--method",
        "fvt",
        "--eval-bytes",
        "0",
        "-o",
        out,
    ]
    assert CliRunner().invoke(transplant_main, [str(a) for a in args]).exit_code == 0
    return out


def transplant_args(pair: dict, out: Path, *extra: object) -> list[object]:
    return [
        "--base",
        pair["base_tied"],
        "--donor",
        pair["donor_model"],
        "--eval-bytes",
        "0",
        "-o",
        out,
        *extra,
    ]


# ---------------------------------------------------------------- item 1: --set paths are inputs


def test_set_hypernet_dir_is_never_the_output(tiny_pair, tmp_path):
    trained = earlier_output(tiny_pair, tmp_path / "hn")  # any folder of ours: it must survive as it is
    args = transplant_args(
        tiny_pair, trained, "--method", "hypernet", "--set", f"hypernet={trained}", "--overwrite"
    )
    run(transplant_main, args, tmp_path, "is an input of this run")


def test_set_corpus_file_is_never_inside_the_output(tiny_pair, tmp_path):
    corpus = tmp_path / "work" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text("the cat sat on the mat\n" * 50)
    args = transplant_args(
        tiny_pair, corpus.parent, "--method", "focus", "--set", f"corpus={corpus}", "--overwrite"
    )
    run(transplant_main, args, tmp_path, "contains an input of this run")


def test_extend_protects_set_paths_too(tiny_pair, tmp_path):
    trained = earlier_output(tiny_pair, tmp_path / "hn")
    args = [
        "extend",
        tiny_pair["base_tied"],
        "--token",
        " catalog",
        "--method",
        "hypernet",
        "--set",
        f"hypernet={trained}",
        "-o",
        trained,
        "--overwrite",
    ]
    run(transplant_main, args, tmp_path, "is an input of this run")


# ---------------------------------------------------------------- item 3: changed files are the user's


def test_overwrite_refuses_an_output_whose_weights_were_replaced(tiny_pair, tmp_path):
    out = earlier_output(tiny_pair, tmp_path / "out")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # fine-tuned in place: same name, same size, new write
    run(
        transplant_main,
        transplant_args(tiny_pair, out, "--method", "fvt", "--overwrite"),
        tmp_path,
        "changed since tokentransplant wrote them (model.safetensors)",
    )


def test_marker_records_size_and_mtime_of_every_file(tiny_pair, tmp_path):
    out = earlier_output(tiny_pair, tmp_path / "out")
    marker = atomic.read_marker(out)
    assert set(marker["stat"]) == set(marker["files"]) and "model.safetensors" in marker["stat"]
    size, mtime_ns = marker["stat"]["model.safetensors"]
    assert (
        size == (out / "model.safetensors").stat().st_size
        and mtime_ns == (out / "model.safetensors").stat().st_mtime_ns
    )
    atomic.check_output(out, overwrite=True)  # unchanged: still ours to replace


def test_marker_without_a_record_is_checked_by_name(tmp_path):
    """Outputs written before the record existed stay replaceable (their names are still checked)."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / atomic.MARKER).write_text(json.dumps({"tool": "tokentransplant", "files": ["config.json"]}))
    assert atomic.check_output(out, overwrite=True) == out


# ---------------------------------------------------------------- items 5, 14: extend --token / --special


def test_extend_huge_token_is_refused_before_any_merge(tiny_pair, tmp_path, monkeypatch):
    import transplant.extend as extend

    monkeypatch.setattr(
        extend, "merges_for_tokens", lambda *a: pytest.fail("merges built for a 100 kB token")
    )
    line = run(
        transplant_main,
        ["extend", tiny_pair["base_tied"], "--token", "ab " * 34_000, "-o", tmp_path / "o"],
        tmp_path,
        "--token 'ab ab ab",
    )
    assert "ab " * 40 not in line and len(line) < 300


def test_extend_split_token_is_named_once_and_short(tiny_pair, tmp_path):
    token = "ab cd " * 150  # 900 bytes: under the cap, but the pre-tokenizer cuts it
    line = run(
        transplant_main,
        ["extend", tiny_pair["base_tied"], "--token", token, "-o", tmp_path / "o"],
        tmp_path,
        "would still be split",
    )
    assert line.count("'ab cd") == 1 and len(line) < 500  # the token is quoted once, by its start


@pytest.mark.parametrize("flag", ["--special", "--token"])
def test_extend_empty_token_does_not_suggest_itself(tiny_pair, tmp_path, flag):
    line = run(
        transplant_main,
        ["extend", tiny_pair["base_tied"], flag, "", "-o", tmp_path / "o"],
        tmp_path,
        "the token is empty",
    )
    assert "--special ''" not in line


# ---------------------------------------------------------------- item 6: YAML bombs


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("unknown_key:\n  " + LAUGHS.replace("\n", "\n  "), "YAML aliases"),
        ("output_dir: out\n" + LAUGHS.replace("a: &a", "b0: &a"), "YAML aliases"),
        ("loop: &x [1, *x]\n", "contains itself"),
    ],
)
def test_yaml_bomb_is_one_line(tmp_path, text, fragment):
    (tmp_path / "bomb.yaml").write_text(text)
    run(distill_main, [tmp_path / "bomb.yaml"], tmp_path, fragment)


def test_references_that_multiply_are_bounded(tmp_path):
    lines = ["output_dir: out/x"] + [
        f"l{i}: [{', '.join([repr(f'${{l{i - 1}}}' if i else '${output_dir}')] * 10)}]" for i in range(8)
    ]  # 10^8 copies of out/x if nothing stops it
    (tmp_path / "refs.yaml").write_text("\n".join(lines) + "\n")

    @recipes.dataclasses.dataclass
    class Free:
        output_dir: str = ""
        l0: list = recipes.dataclasses.field(default_factory=list)
        l1: list = recipes.dataclasses.field(default_factory=list)
        l2: list = recipes.dataclasses.field(default_factory=list)
        l3: list = recipes.dataclasses.field(default_factory=list)
        l4: list = recipes.dataclasses.field(default_factory=list)
        l5: list = recipes.dataclasses.field(default_factory=list)
        l6: list = recipes.dataclasses.field(default_factory=list)
        l7: list = recipes.dataclasses.field(default_factory=list)

    with pytest.raises(TransplantError, match="expand to more than"):
        recipes.load_recipe(Free, tmp_path / "refs.yaml")


def test_set_value_with_an_alias_bomb_is_refused():
    with pytest.raises(TransplantError, match="YAML aliases"):
        recipes.parse_assignment(
            "x="
            + "{a: &a [1,1,1,1,1,1,1,1,1,1], "
            + ", ".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdef", "bcdefg"))
            + "}"
        )


# ---------------------------------------------------------------- item 7: 50 MB strings


def test_huge_output_path_is_refused_before_loading(tiny_pair, tmp_path, monkeypatch):
    import transplant.pipeline as pipeline

    monkeypatch.setattr(
        pipeline, "load_vocab", lambda *a, **k: pytest.fail("loaded before checking the output")
    )
    run(transplant_main, transplant_args(tiny_pair, tmp_path / BIG, "--method", "fvt"), tmp_path, "too long")


def test_long_file_name_is_refused_with_a_short_line(tmp_path):
    with pytest.raises(TransplantError, match="too long") as err:
        atomic.check_output(tmp_path / ("n" * 300), overwrite=False)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("key", ["output_dir", "loss.name"])
def test_huge_recipe_string_is_one_short_line(tmp_path, key):
    (tmp_path / "heal.yaml").write_text("output_dir: out\n")
    run(distill_main, [tmp_path / "heal.yaml", "--set", f"{key}={BIG}"], tmp_path, "shorten it")


def test_error_messages_are_capped():
    message = str(TransplantError(f"unknown loss {BIG!r}; choose one of alm, ce"))
    assert len(message) <= MAX_MESSAGE_CHARS and message.startswith("unknown loss 'xxx")
    assert message.endswith("choose one of alm, ce")


# ---------------------------------------------------------------- item 8: non-finite and 64-bit options


@pytest.mark.parametrize(
    "method, setting",
    [
        ("fvt-ls", "ridge=inf"),
        ("fvt-ls", "ridge=nan"),
        ("byte-pool-learned", "lr=inf"),
        ("random", "seed=99999999999999999999999"),
    ],
)
def test_non_finite_or_oversized_option_is_refused(tiny_pair, tmp_path, method, setting):
    run(
        transplant_main,
        transplant_args(tiny_pair, tmp_path / "out", "--method", method, "--set", setting),
        tmp_path,
        "not a finite number within 64 bits",
    )


def test_options_at_the_64_bit_edges_pass():
    assert parse_options("random", {"seed": 2**63 - 1})["seed"] == 2**63 - 1
    assert parse_options("fvt-ls", {"ridge": "1e300"})["ridge"] == 1e300


# ---------------------------------------------------------------- item 9: padding


def test_huge_pad_multiple_is_refused_before_loading(tiny_pair, tmp_path):
    run(
        transplant_main,
        transplant_args(
            tiny_pair, tmp_path / "out", "--method", "fvt", "--pad-to-multiple-of", 1_000_000_000
        ),
        tmp_path,
        "--pad-to-multiple-of",
    )


def test_padding_is_bounded_in_the_library_too():
    assert surgery.padded_rows(100, 64) == 128
    with pytest.raises(TransplantError, match="pad_to_multiple_of"):
        surgery.padded_rows(100, 1_000_000_000)


# ---------------------------------------------------------------- item 12: the summary names what it measured


def lowercasing_donor(pair: dict, directory: Path) -> Path:
    """The donor tokenizer with a Lowercase normalizer: lossless on lower-case text, lossy on the rest."""
    shutil.copytree(pair["donor_tok"], directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory


def test_summary_names_only_the_slices_compared(tiny_pair, tmp_path, monkeypatch):
    import cli

    slices = {"english": "the cat sat on the mat. " * 40, "code": "Def Add(A, B):\n    Return A + B\n" * 40}
    monkeypatch.setattr(cli, "_default_eval_texts", lambda n_bytes: slices)
    args = [
        "--base",
        tiny_pair["base_tied"],
        "--donor",
        lowercasing_donor(tiny_pair, tmp_path / "lower"),
        "--method",
        "fvt",
        "-o",
        tmp_path / "out",
    ]
    result = CliRunner().invoke(transplant_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "bits/byte on held-out english:" in result.output and "english+code" not in result.output


# ---------------------------------------------------------------- item 13: conflicting --map-token


def test_conflicting_map_tokens_are_refused(tiny_pair, tmp_path):
    args = [
        "--base",
        tiny_pair["base_tied"],
        "--donor",
        tiny_pair["donor_tok"],
        "--eval-bytes",
        "0",
        "-o",
        tmp_path / "out",
        "--map-token",
        "<pad>=<s>",
        "--map-token",
        "<pad>=</s>",
    ]
    run(transplant_main, args, tmp_path, "--map-token <pad> is given twice")


def test_repeated_identical_map_token_is_fine():
    from transplant.tokenizers.control import parse_token_map

    assert parse_token_map(["<pad>=<s>", "<pad>=<s>"]) == {"<pad>": "<s>"}
