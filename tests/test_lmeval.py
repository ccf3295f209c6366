"""Stock lm-eval on the project's local tasks (tt_bpb_*, tt_mc_small), on tiny models built here.

lm-eval is slow to start, so one module-scoped run serves most tests. It runs with every socket connect
refused: local tasks and local models must never touch the hub.
"""

from __future__ import annotations

import json
import math
import shutil
import socket

import pytest

from transplant.assets import catalog
from transplant.errors import TransplantError
from transplant.eval import lmeval

SAMPLE_TEXT = (
    "The river ran past the old mill and under the stone bridge.\n"
    "def area(width, height):\n    return width * height\n"
    "Numbers like 42, 1999 and 3.5 show up in ordinary prose.\n"
    "Über die Brücke gingen drei Kinder nach Hause.\n"
) * 6
# every document fits one 256-token window of the tiny models, so both scorers see the same thing
DOC_BYTES = 160
MC_LIMIT = 12


def _with_bos_added(src, dst):
    """A copy of a tiny model whose tokenizer prepends <s> on encode, as SentencePiece Llama/Mistral ones
    do."""
    from tokenizers import Tokenizer, processors

    shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos_id)])
    tok.save(str(dst / "tokenizer.json"))
    return dst


def _refuse_connect(*args, **kwargs):
    raise AssertionError(f"network access attempted during a local lm-eval run: {args}")


@pytest.fixture(scope="module")
def models(tiny_pair, tmp_path_factory):
    plain = tiny_pair["base_tied"]
    return {"plain": plain, "bos": _with_bos_added(plain, tmp_path_factory.mktemp("lmeval") / "bos")}


@pytest.fixture(scope="module")
def run(models):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse_connect)
        patch.setattr(socket, "create_connection", _refuse_connect)
        results = lmeval.run_lm_eval([str(models["plain"]), str(models["bos"])],
                                     ["tt_mc_small", "tt_bpb_sample"], limit=MC_LIMIT,
                                     texts={"sample": SAMPLE_TEXT}, doc_bytes=DOC_BYTES)
    return results


def test_mc_small_runs_with_limit(run, models):
    for name in (str(models["plain"]), str(models["bos"])):
        mc = run[name]["tt_mc_small"]
        assert mc["samples"] == MC_LIMIT
        assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0
        assert mc["acc_stderr"] > 0


def test_bpb_matches_transplant_evaluate(run, models):
    from transplant.eval.bpb import bits_per_byte, load_for_eval

    docs = lmeval.heldout_documents("sample", doc_bytes=DOC_BYTES, texts={"sample": SAMPLE_TEXT})
    assert "".join(docs) == SAMPLE_TEXT
    model, tokenizer = load_for_eval(models["plain"])
    assert max(len(tokenizer.encode(doc)) for doc in docs) < model.config.max_position_embeddings
    ours = bits_per_byte(model, tokenizer, docs, max_length=model.config.max_position_embeddings)
    for name in (str(models["plain"]), str(models["bos"])):
        bpb = run[name]["tt_bpb_sample"]
        assert bpb["samples"] == len(docs)
        assert bpb["bits_per_byte"] == pytest.approx(ours, rel=1e-4)
        assert bpb["byte_perplexity"] == pytest.approx(2 ** bpb["bits_per_byte"], rel=1e-6)


def test_bos_adding_tokenizer_is_not_charged_for_bos(models):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(models["plain"])
    bos = AutoTokenizer.from_pretrained(models["bos"])
    assert bos.encode("hello")[0] == bos.bos_token_id and plain.encode("hello")[0] != plain.bos_token_id


def test_table_has_one_row_per_model_and_task_metric_columns(run, models):
    table = lmeval.format_table(run)
    lines = table.splitlines()
    assert len(lines) == 2 + 2  # header, rule, two models
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["model", "tt_mc_small/acc", "tt_mc_small/acc_norm", "tt_bpb_sample/word_perplexity",
                      "tt_bpb_sample/bits_per_byte"]
    row = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert row[0] == str(models["plain"])
    assert (float(row[4])
            == pytest.approx(run[str(models["plain"])]["tt_bpb_sample"]["bits_per_byte"], abs=1e-4))
    assert "±" in row[1]  # acc carries its standard error
    only_bpb = lmeval.format_table(run, metrics=["bits_per_byte"]).splitlines()[0]
    assert "acc" not in only_bpb and "tt_bpb_sample/bits_per_byte" in only_bpb


def test_split_documents_round_trips_and_respects_size():
    text = "short line\n" * 30 + "é" * 500 + "\n" + "1 22 333 " * 200 + "end"
    docs = lmeval.split_documents(text, 100)
    assert "".join(docs) == text
    assert all(0 < len(doc.encode("utf-8")) <= 100 for doc in docs)
    assert lmeval.split_documents("", 100) == []


def test_prepare_local_tasks_writes_absolute_paths_and_reuses_dir(tmp_path):
    import yaml

    kwargs = {"texts": {"sample": SAMPLE_TEXT}, "doc_bytes": DOC_BYTES, "root": tmp_path}
    first = lmeval.prepare_local_tasks(["tt_bpb_sample", "tt_mc_small"], **kwargs)
    again = lmeval.prepare_local_tasks(["tt_bpb_sample", "tt_mc_small"], **kwargs)
    assert first == again
    for task in ("tt_bpb_sample", "tt_mc_small"):
        config = yaml.safe_load((first / f"{task}.yaml").read_text())
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert (config["task"] == task and data_file.startswith("/")
                and (first / f"{task}.jsonl").samefile(data_file))
    other = lmeval.prepare_local_tasks(["tt_bpb_sample"], texts={"sample": "other text\n"}, root=tmp_path)
    assert other != first
    assert [json.loads(line)["text"]
            for line in (other / "tt_bpb_sample.jsonl").read_text().splitlines()] == [
        "other text\n"]


def test_mc_small_data_is_well_formed():
    rows = json.loads((lmeval.TEMPLATE_DIR / "tt_mc_small.json").read_text())
    assert 60 <= len(rows) <= 100
    assert len({row["id"] for row in rows}) == len(rows) == len({row["query"] for row in rows})
    assert all(len(row["choices"]) == 4 and len(set(row["choices"])) == 4 for row in rows)
    answers = [row["answer"] for row in rows]
    assert all(0 <= a < 4 for a in answers) and min(answers.count(a) for a in range(4)) >= len(rows) // 6
    assert {row["kind"] for row in rows} == {"knowledge", "commonsense", "arithmetic", "completion"}


def test_list_local_tasks():
    slices = lmeval.bpb_slices()
    assert {"english", "code", "german", "numbers"} <= set(slices)
    assert lmeval.list_local_tasks({"mine": "x"}) == [f"tt_bpb_{name}" for name in slices] + ["tt_bpb_mine",
                                                                                            "tt_mc_small"]


def test_errors_name_the_problem(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TransplantError, match="not a local model dir"):
        lmeval.run_lm_eval([str(tmp_path / "missing")], ["tt_mc_small"])
    with pytest.raises(TransplantError, match="hub.*tt_mc_small"):
        lmeval.run_lm_eval([str(tiny_pair["base_tied"])], ["hellaswag"])
    with pytest.raises(TransplantError, match="unknown local task.*tt_bpb_klingon.*tt_mc_small"):
        lmeval.run_lm_eval([str(tiny_pair["base_tied"])], ["tt_bpb_klingon"])
    with pytest.raises(TransplantError, match="no lm-eval task"):
        lmeval.run_lm_eval([str(tiny_pair["base_tied"])], [])


def test_tt_bpb_expands_to_every_slice():
    every = [f"tt_bpb_{name}" for name in lmeval.bpb_slices()]
    assert (lmeval._expand_tasks(["tt_bpb", "tt_mc_small"], {"mine": "x"})
            == every + ["tt_bpb_mine", "tt_mc_small"])
    assert lmeval._expand_tasks("tt_mc_small,tt_bpb_code", None) == ["tt_mc_small", "tt_bpb_code"]


@pytest.mark.slow
def test_smollm2_above_chance_and_bpb_near_reference():
    from transplant.eval.bpb import bits_per_byte, load_for_eval

    model_dir = catalog.resolve_model("smollm2-135m")
    results = lmeval.run_lm_eval([model_dir], ["tt_mc_small", "tt_bpb_english"], bpb_bytes=16384)
    scores = results[str(model_dir)]
    assert scores["tt_mc_small"]["samples"] == 80
    assert scores["tt_mc_small"]["acc"] > 0.25 + 3 * scores["tt_mc_small"]["acc_stderr"]  # chance is 0.25
    bpb = scores["tt_bpb_english"]["bits_per_byte"]
    # measured 0.936 (9 documents of ~2 KB); `transplant eval` on the whole slice: 0.896
    assert 0.85 < bpb < 1.3
    model, tokenizer = load_for_eval(model_dir)
    docs = lmeval.heldout_documents("english", n_bytes=16384)
    assert bpb == pytest.approx(bits_per_byte(model, tokenizer, docs), rel=1e-4)
    assert math.isfinite(scores["tt_bpb_english"]["word_perplexity"])
