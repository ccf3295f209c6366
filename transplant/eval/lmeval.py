"""Validation with stock lm-eval: local offline tasks (bits per byte, a small multiple-choice set) and, when
the hub is reachable, any lm-eval task by name.

Why stock lm-eval and not only `transplant.eval.bpb`: users compare transplanted models with numbers from the
harness everyone uses. Offline there are no hub data sets, so the project ships task templates and data;
lm-eval wants absolute `data_files` paths, so concrete YAMLs are written into the cache at run time.

Local tasks:
  tt_bpb_<slice>  loglikelihood_rolling over a held-out slice of `transplant.assets.texts` (english, code,
                  german, numbers, spanish, python-docs) or over caller text (`texts=`), cut into documents of
                  about `doc_bytes` bytes at line breaks; metrics word_perplexity, byte_perplexity,
                  bits_per_byte. `tt_bpb` expands to every slice.
  tt_mc_small     80 original 4-way multiple-choice items scored by log-likelihood (acc, acc_norm; chance
                  0.25).

Bits per byte, lm-eval vs `transplant.eval.bpb.bits_per_byte`: on the same documents they agree when each
document fits in one context window (both prepend BOS, EOS when there is none, and score every text token).
They differ on longer text: `evaluate` cuts windows of max_length-1 tokens that each restart from BOS; lm-eval
predicts max_length tokens per window and conditions each later window on one token of the previous one only.
Cutting a slice into ~2 KB documents keeps both inside one window and gives every model, whatever its
tokenizer, the same context in bytes; the price is less context than `transplant eval`, which scores the slice
as one text (so tt_bpb_* numbers are higher than `transplant eval`'s for the same slice). lm-eval would also
score the BOS that a tokenizer adds on encode (SentencePiece Llama/Mistral style) as a first text token,
charging such tokenizers for it; the bpb tasks therefore run with add_bos_token=False (BOS stays as the
prefix).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from transplant.errors import TransplantError
from transplant.eval.lmeval_stock import StockRun, hub_offline, write_atomic
from transplant.recipes import env_flag

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "lm_eval_tasks"
BPB_PREFIX = "tt_bpb_"
BPB_ALL = "tt_bpb"
MC_TASKS = {"tt_mc_small": ("tt_mc_small.yaml", "tt_mc_small.json")}
DEFAULT_BPB_BYTES = 16384  # what `transplant eval` scores per slice
DEFAULT_DOC_BYTES = 2048
_HIDDEN_BY_DEFAULT = ("byte_perplexity",)  # 2 ** bits_per_byte: redundant in a table


def bpb_slices() -> list[str]:
    """Names of the built-in held-out text slices (`transplant.assets.texts`), each a task tt_bpb_<name>."""
    from transplant.assets.texts import TEXTS

    return list(TEXTS)


def list_local_tasks(texts: Mapping[str, str] | None = None) -> list[str]:
    """Task names that run without the hub (the built-in slices, `texts` given by the caller, tt_mc_small)."""
    slices = bpb_slices()
    slices += [name for name in (texts or {}) if name not in slices]
    return [BPB_PREFIX + name for name in slices] + sorted(MC_TASKS)


def split_documents(text: str, doc_bytes: int = DEFAULT_DOC_BYTES) -> list[str]:
    """Cut `text` into documents of about `doc_bytes` UTF-8 bytes, at line breaks where there are any.

    The pieces concatenate back to `text` exactly, so the bytes scored are the bytes of the slice.
    """
    if doc_bytes < 1:
        raise TransplantError(f"doc_bytes must be positive, got {doc_bytes}")
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        line_bytes = len(line.encode("utf-8"))
        if current and size + line_bytes > doc_bytes:
            docs.append("".join(current))
            current, size = [], 0
        # one very long line (numbers, minified code): cut at a space or anywhere
        while line_bytes > doc_bytes:
            head = _cut_utf8(line, doc_bytes)
            docs.append(head)
            line = line[len(head):]
            line_bytes = len(line.encode("utf-8"))
        current.append(line)
        size += line_bytes
    if current:
        docs.append("".join(current))
    return [doc for doc in docs if doc]


def _cut_utf8(line: str, max_bytes: int) -> str:
    head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    space = head.rfind(" ")
    return head[: space + 1] if space > len(head) // 2 else head


def heldout_documents(name: str, *, n_bytes: int = DEFAULT_BPB_BYTES, doc_bytes: int = DEFAULT_DOC_BYTES,
                      texts: Mapping[str, str] | None = None) -> list[str]:
    """The documents task `tt_bpb_<name>` scores: `texts[name]` if given, else the held-out slice `name`."""
    if texts and name in texts:
        text = texts[name]
    else:
        from transplant.assets import texts as heldout_texts

        text = heldout_texts.heldout(name, n_bytes=n_bytes)
    docs = split_documents(text, doc_bytes)
    if not docs:
        raise TransplantError(f"text for tt_bpb_{name} is empty; pass a non-empty text")
    return docs


def _expand_tasks(tasks: Sequence[str], texts: Mapping[str, str] | None) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    expanded: list[str] = []
    for task in tasks:
        names = ([t for t in list_local_tasks(texts) if t.startswith(BPB_PREFIX)] if task == BPB_ALL
                 else [task])
        expanded += [name for name in names if name not in expanded]
    if not expanded:
        raise TransplantError(f"no lm-eval task given; local tasks: {', '.join(list_local_tasks(texts))}")
    return expanded


def _is_local(task: str) -> bool:
    return task.startswith(BPB_PREFIX) or task in MC_TASKS


def _hub_reachable() -> bool:
    """Whether lm-eval could fetch hub data sets (offline env vars say no without trying)."""
    if env_flag("HF_DATASETS_OFFLINE"):
        return False
    from transplant.assets.catalog import is_hub_offline

    return not is_hub_offline()


def _render(template_name: str, **values: str) -> str:
    template = string.Template((TEMPLATE_DIR / template_name).read_text(encoding="utf-8"))
    return template.substitute({key: json.dumps(value) if key != "task" else value
                                for key, value in values.items()})


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _mc_rows(data_name: str) -> list[dict]:
    rows = json.loads((TEMPLATE_DIR / data_name).read_text(encoding="utf-8"))
    for row in rows:
        if not (isinstance(row.get("choices"), list) and 0 <= row.get("answer", -1) < len(row["choices"])):
            raise TransplantError(f"bad item {row.get('id')!r} in {data_name}: answer must index its choices")
    return rows


def prepare_local_tasks(tasks: Sequence[str], *, bpb_bytes: int = DEFAULT_BPB_BYTES,
                        doc_bytes: int = DEFAULT_DOC_BYTES, texts: Mapping[str, str] | None = None,
                        root: Path | None = None) -> Path:
    """Write concrete YAMLs + jsonl data for the local `tasks` into a content-addressed cache dir; return it.

    The dir is named by a hash of everything in it, so a rerun on the same text reuses it (and the datasets
    cache inside it) and different texts never mix.
    """
    from transplant.cache import cache_dir

    files: dict[str, str] = {}
    for task in tasks:
        if task in MC_TASKS:
            template, data_name = MC_TASKS[task]
            files[f"{task}.jsonl"] = _jsonl(_mc_rows(data_name))
            files[f"{task}.yaml"] = template
        elif task.startswith(BPB_PREFIX):
            name = task[len(BPB_PREFIX):]
            docs = heldout_documents(name, n_bytes=bpb_bytes, doc_bytes=doc_bytes, texts=texts)
            files[f"{task}.jsonl"] = _jsonl([{"text": doc} for doc in docs])
            files[f"{task}.yaml"] = "tt_bpb.yaml"
    digest = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:16]
    base = Path(root) if root else cache_dir() / "lm_eval_tasks"
    target = base / digest
    if target.exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        for name, content in files.items():
            if not name.endswith(".yaml"):
                write_atomic(staging / name, content)
        for name, template in files.items():
            if name.endswith(".yaml"):
                task = name[: -len(".yaml")]
                yaml_text = _render(template, task=task, data_file=str(target / f"{task}.jsonl"),
                                    datasets_cache=str(target / "hf_datasets"),
                                    description=f"tokentransplant local task {task}")
                write_atomic(staging / name, yaml_text)
        try:
            os.replace(staging, target)
        except OSError:  # another run wrote the same content first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _resolve_model_dir(spec: str | Path) -> Path:
    path = Path(spec).expanduser()
    if not path.exists() and isinstance(spec, str):
        from transplant.assets import catalog

        try:
            resolved = catalog.resolve_model(spec)
        except TransplantError:
            resolved = None
        if resolved is not None and not isinstance(resolved, str):
            path = Path(resolved)
    if not path.is_dir() or not (path / "config.json").exists():
        raise TransplantError(
            f"model {str(spec)!r} is not a local model dir (config.json + weights); "
            "pass a model dir or an offline alias such as smollm2-135m"
        )
    return path.resolve()


def _dtype_arg(dtype) -> str:
    if dtype is None:
        return "float32"
    return str(dtype).removeprefix("torch.")


def _collect(raw: dict, task_names: Sequence[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, values in raw.get("results", {}).items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt in ("", "none") else f"{metric}[{filt}]"] = float(value)
        samples = raw.get("n-samples", {}).get(task, {})
        if "effective" in samples:
            metrics["samples"] = float(samples["effective"])
        out[task] = metrics
    missing = [task for task in task_names if task not in out]
    if missing:
        log.warning("lm-eval returned no results for %s", ", ".join(missing))
    return out


def _make_lm(model_dir: Path, *, device: str, batch_size: int | str, dtype, max_length: int | None,
             trust_remote_code: bool = False):
    from lm_eval.api.registry import get_model

    args: dict[str, object] = {"pretrained": str(model_dir), "dtype": _dtype_arg(dtype),
                               "trust_remote_code": trust_remote_code}
    if max_length:
        args["max_length"] = int(max_length)
    return get_model("hf").create_from_arg_obj(args, {"batch_size": batch_size, "device": device})


@dataclass(frozen=True)
class ModelResult:
    """One model's numbers and the stock lm-eval runs (one per group of tasks) that reproduce them."""

    name: str
    results: dict[str, dict[str, float]]
    runs: tuple[StockRun, ...]


def run_lm_eval(models: Sequence[str | Path], tasks: Sequence[str],
                **kwargs) -> dict[str, dict[str, dict[str, float]]]:
    """Run stock lm-eval ("hf" model type) on each model dir; return {model: {task: {metric: value}}}.

    Takes the arguments of `iter_lm_eval`, which yields each model's result as soon as it is done.
    """
    return {done.name: done.results for done in iter_lm_eval(models, tasks, **kwargs)}


def iter_lm_eval(models: Sequence[str | Path], tasks: Sequence[str], *, device: str = "cpu",
                 batch_size: int | str = 8, limit: int | float | None = None, dtype=None,
                 bpb_bytes: int = DEFAULT_BPB_BYTES, doc_bytes: int = DEFAULT_DOC_BYTES,
                 texts: Mapping[str, str] | None = None, max_length: int | None = None,
                 num_fewshot: int | None = None, trust_remote_code: bool = False) -> Iterator[ModelResult]:
    """Stock lm-eval on each model dir in turn, yielding each model's `ModelResult` when it finishes.

    Local tasks (see `list_local_tasks`; `tt_bpb` = every slice, `texts` adds tt_bpb_<key> over caller text)
    run fully offline. Any other name is passed to lm-eval unchanged, which needs the hub for its data.
    Inputs are all checked before the first model loads.
    """
    task_names = _expand_tasks(tasks, texts)
    local = [task for task in task_names if _is_local(task)]
    remote = [task for task in task_names if not _is_local(task)]
    known_local = list_local_tasks(texts)
    unknown_local = [task for task in local if task not in known_local]
    if unknown_local:
        raise TransplantError(
            f"unknown local task(s) {', '.join(unknown_local)} (no such held-out text slice); local tasks: "
            f"{', '.join(known_local)}; or pass your own text as texts={{name: text}} for tt_bpb_<name>"
        )
    if remote and not _hub_reachable():
        raise TransplantError(
            f"lm-eval task(s) {', '.join(remote)} need the Hugging Face hub, which is not reachable; "
            f"offline, use the local tasks: {', '.join(known_local)}"
        )
    model_dirs = {str(spec): _resolve_model_dir(spec) for spec in models}
    if not model_dirs:
        raise TransplantError("no model given to evaluate; pass one or more model dirs")
    include = (prepare_local_tasks(local, bpb_bytes=bpb_bytes, doc_bytes=doc_bytes, texts=texts)
               if local else None)

    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include) if include else None, include_defaults=bool(remote))
    unknown = [task for task in remote if task not in manager.all_tasks]
    if unknown:
        raise TransplantError(f"unknown lm-eval task(s) {', '.join(unknown)}; local tasks: "
                              f"{', '.join(known_local)}")
    bpb_tasks = [task for task in task_names if task.startswith(BPB_PREFIX)]
    other_tasks = [task for task in task_names if not task.startswith(BPB_PREFIX)]
    for name, model_dir in model_dirs.items():
        log.info("lm-eval on %s (%s): %s", name, model_dir, ", ".join(task_names))
        with contextlib.nullcontext() if remote else hub_offline():
            lm = _make_lm(model_dir, device=device, batch_size=batch_size, dtype=dtype, max_length=max_length,
                          trust_remote_code=trust_remote_code)
            per_task: dict[str, dict[str, float]] = {}
            runs: list[StockRun] = []
            default_bos = getattr(lm, "add_bos_token", None)
            for group, add_bos in ((bpb_tasks, False), (other_tasks, default_bos)):
                if not group:
                    continue
                lm.add_bos_token = add_bos  # the model_arg add_bos_token, per group of tasks
                raw = lm_eval.simple_evaluate(model=lm, tasks=group, task_manager=manager, limit=limit,
                                              num_fewshot=num_fewshot, bootstrap_iters=1000,
                                              log_samples=False)
                per_task.update(_collect(raw or {}, group))
                runs.append(StockRun(model_dir, tuple(group), add_bos, _dtype_arg(dtype), device, batch_size,
                                     include if any(_is_local(task) for task in group) else None, limit,
                                     max_length, num_fewshot, trust_remote_code, offline=not remote))
        del lm
        gc.collect()
        _empty_device_cache()
        yield ModelResult(name, {task: per_task[task] for task in task_names if task in per_task},
                          tuple(runs))


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cell(metrics: Mapping[str, float], metric: str) -> str:
    value = metrics.get(metric)
    if value is None:
        return "-"
    stderr = metrics.get(f"{metric}_stderr")
    text = f"{value:.4f}" if abs(value) < 1e4 else f"{value:.5g}"
    return f"{text} ± {stderr:.4f}" if stderr else text


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                 metrics: Sequence[str] | None = None, ) -> str:
    """Markdown table: one row per model, one column per task/metric (± stderr where lm-eval gives one).

    `metrics` picks which metrics to show; by default all but stderr, sample counts and byte_perplexity.
    """
    columns: list[tuple[str, str]] = []
    for per_task in results.values():
        for task, values in per_task.items():
            for metric in values:
                hidden = metric.endswith("_stderr") or metric == "samples" or metric in _HIDDEN_BY_DEFAULT
                wanted = metric in metrics if metrics is not None else not hidden
                if wanted and (task, metric) not in columns:
                    columns.append((task, metric))
    header = ["model"] + [f"{task}/{metric}" for task, metric in columns]
    rows = [[name] + [_cell(per_task.get(task, {}), metric) for task, metric in columns]
            for name, per_task in results.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"
             for row in [header]]
    lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    lines += ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def score_line(results: Mapping[str, Mapping[str, float]]) -> str:
    """One model's numbers on one line (`task/metric=value, ...`), for progress output."""
    return ", ".join(f"{task}/{metric}={value:.4f}" for task, metrics in results.items()
                     for metric, value in metrics.items()
                     if not metric.endswith("_stderr") and metric != "samples"
                     and metric not in _HIDDEN_BY_DEFAULT)


def save_results(folder: Path, done: Sequence[ModelResult],
                 names: Mapping[str, str] | None = None) -> list[Path]:
    """Write results.json, results.md and `lm_eval_command.txt` (the stock commands) into `folder`.

    Called after every model, so a long run that stops keeps the models it finished.
    """
    from transplant.eval.lmeval_stock import write_command_file

    table = {(names or {}).get(item.name, item.name): item.results for item in done}
    return [write_atomic(folder / "results.json", json.dumps(table, indent=2) + "\n"),
            write_atomic(folder / "results.md", format_table(table) + "\n"),
            write_command_file(folder, [run for item in done for run in item.runs])]

