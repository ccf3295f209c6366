"""Adding a loss is one new module plus one entry point, and the real trainer runs it.

The throwaway loss (tests/chunk_rate_plugin.py) is found the way an outside package's loss is: a fake
installed distribution on sys.path declares it in the `tokentransplant.losses` entry-point group, and the
registry imports it on the next lookup. It declares a per-pair table through `prepare`, which of its metrics
are sums, and a typed option; the trainer is told nothing.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_recipe
from distill.losses import LOSSES, available_losses, get_loss, loss_options, register, registry
from tests.test_trainer import make_recipe, run_in_process, weights
from transplant.errors import TransplantError

NAME = "test-chunk-rate"
MODULE = "tests.chunk_rate_plugin"


@pytest.fixture
def plugin_loss(tmp_path, monkeypatch):
    """Install a fake distribution whose entry point names the plug-in module; undo it afterwards."""
    dist = tmp_path / "site" / "tt_chunk_rate-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tt-chunk-rate\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{NAME} = {MODULE}\n")
    monkeypatch.syspath_prepend(str(dist.parent))
    monkeypatch.setattr(registry, "_discovered", False)  # the next lookup reads the entry points again
    assert NAME not in LOSSES and MODULE not in sys.modules  # nothing imported it: the entry point will
    yield get_loss(NAME)
    LOSSES.pop(NAME, None)  # the registry is process-wide: leave it as the other tests expect it
    sys.modules.pop(MODULE, None)


def test_an_entry_point_loss_runs_through_the_trainer(tmp_path, tiny_pair, plugin_loss):
    assert NAME in available_losses() and plugin_loss.fn.__module__ == MODULE
    recipe = make_recipe(tmp_path, tiny_pair, "plugin", train={"steps": 2, "grad_accum": 2},
                         loss={"name": NAME, "options": {NAME: {"scale": "2"}}})
    trainer, result = run_in_process(recipe)
    assert trainer.teacher is not None and trainer.loss is plugin_loss
    assert trainer.loss_options == {"scale": 2.0}  # typed by its Option
    assert trainer.loss_extras["token_bytes"].shape == (len(trainer.student_vocab),)  # from prepare, per pair
    steps = [r for r in result["history"] if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert 0 < record["loss"] == record["chunk_rate"] and torch.isfinite(torch.tensor(record["loss"]))
        # declared sums add up over the two micro-batches to the global count; the rest is averaged
        assert record["chunks"] == record["num_items_local"] == record["num_items"] > 0
        assert record["chunks_per_micro_batch"] == record["num_items"] / 2
    before, after = load_file(tiny_pair["donor_model"] / "model.safetensors"), weights(recipe["output_dir"])
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_plugin_options_are_typed_checked_and_complete(plugin_loss):
    assert [o.name for o in plugin_loss.options] == ["scale"]
    assert loss_options(NAME, {}) == {"scale": 1.0}  # the default lives in the Option
    typo = f"loss.options.{NAME}.scal is not an option of .*it takes: scale"
    with pytest.raises(TransplantError, match=typo):
        loss_options(NAME, {NAME: {"scal": 2.0}})
    expected = (rf"^loss.options.{NAME}.scale=11: out of range for loss '{NAME}'; "
                r"scale \(float in \[0.0, 10.0\], default 1.0\): factor on the loss$")
    with pytest.raises(TransplantError, match=expected):
        loss_options(NAME, {NAME: {"scale": 11}})


@pytest.mark.parametrize(("setting", "message"), [
    ("loss.options.alm.temperature=hot",
     "loss.options.alm.temperature=hot: could not convert string to float: 'hot' for loss 'alm'; "
     "temperature (float in [0.0, ], default 100.0)"),
    ("loss.options.alm.debias=sometimes", "loss.options.alm.debias=sometimes: not one of merge, append"),
    ("loss.options.uld.top_k=0", "loss.options.uld.top_k=0: out of range for loss 'uld'"),
    ("loss.name=nope", "unknown distillation loss 'nope'; choose one of: alm, alm-l1, ce, mined, uld"),
])
def test_a_bad_loss_option_fails_when_the_recipe_is_read(tmp_path, setting, message):
    """Before any model loads: the models named here do not exist, and the error is about the loss."""
    recipe = {"teacher": {"path": str(tmp_path / "no-teacher")},
              "student": {"path": str(tmp_path / "no-student")},
              "loss": {"name": "uld" if ".uld." in setting else "alm"}}
    with pytest.raises(TransplantError) as err:
        load_recipe(data=recipe, overrides=[setting])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_built_in_losses_declare_every_keyword_they_take():
    for name in ("alm", "alm-l1", "ce", "uld", "mined"):
        options = loss_options(name, {})
        assert options == {o.name: o.default for o in get_loss(name).options}
    assert "diff" in loss_options("alm", {}) and "diff" not in loss_options("alm-l1", {})
    older = loss_options("alm", {"alm": {"debias": True, "temperature": 50}})  # booleans of older recipes
    assert older["debias"] == "merge" and older["temperature"] == 50.0

    def undeclared(batch, *, num_items=None, scale=1.0):
        raise AssertionError("never registered, never called")

    with pytest.raises(TransplantError, match="declare one Option per keyword parameter"):
        register("test-undeclared", count_items=lambda batch: 0)(undeclared)
    assert "test-undeclared" not in LOSSES


def test_duplicate_registration_is_an_error_a_reload_is_not(plugin_loss):
    def other(batch, *, num_items=None):
        raise AssertionError("never registered, never called")

    for name in (NAME, "alm"):
        with pytest.raises(TransplantError, match=f"loss '{name}' is registered twice .*rename one of them"):
            register(name, count_items=lambda batch: 0)(other)
    assert get_loss(NAME) is plugin_loss and get_loss("alm").fn.__name__ == "alm_loss"
    reloaded = importlib.reload(sys.modules[MODULE])  # the same module imported again registers the same loss
    assert get_loss(NAME).fn is reloaded.chunk_rate_loss
