"""What the three command lines in `cli` (`transplant`, `distill`, `hypernet`) share: one user-error handler,
the `--set KEY=VALUE` option, `--device`, UTF-8 text files, logging, the deepspeed launcher's `--local_rank`
and the torchrun relaunch. Only `cli` imports this module; the libraries below it know nothing of click.

The handler lives in the command classes (`Command`, `Group`): a `TransplantError` raised anywhere below them,
while parsing options or while running, becomes `error: <one line>` on stderr and exit code 2. Putting it in
the classes rather than a decorator means a new subcommand cannot forget it. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from transplant.errors import TransplantError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
NOISY_LOGGERS = ("transformers", "datasets", "urllib3", "filelock", "huggingface_hub", "DeepSpeed",
                 "deepspeed", "torch.distributed")


def one_line(message: object) -> str:
    """The message on one line: a user error is one line even when a library's text inside it is not."""
    text = re.sub(r"\s*\n\s*", " ", str(message)).strip()
    return text or "unknown problem (no message); rerun with -v and report it"


class UserError(click.ClickException):
    """A TransplantError as click reports errors: `error: <line>` on stderr, exit code 2."""

    exit_code = TransplantError.exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2; 8.1 exits with the help


def _as_user_error(err: Exception) -> click.ClickException:
    if isinstance(err, _NO_ARGS_HELP):  # `hypernet` alone: the help, as click shows it
        return err
    if isinstance(err, click.UsageError):  # click's own (unknown option, missing argument): one line as well
        where = err.ctx.command_path if err.ctx is not None else "the command"
        return UserError(f"{one_line(err.format_message()).rstrip('.')}; see {where} --help")
    return UserError(one_line(err))


class _UserErrors:
    """Mixin: a TransplantError or click usage error from parsing (`make_context`) or running (`invoke`)
    becomes a one-line UserError. Groups run their subcommands inside `invoke`, so the top command covers the
    tree."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)  # type: ignore[misc]
        except (TransplantError, click.UsageError) as err:
            raise _as_user_error(err) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except (TransplantError, click.UsageError) as err:
            raise _as_user_error(err) from None


class Command(_UserErrors, click.Command):
    """A click command with the user-error handler. A stray positional argument is a one-line error too, and
    `key=value` without `--set` (the old override syntax) is told how to write it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # collected into ctx.args and reported below, instead of click's usage text
        ctx.allow_extra_args = True
        rest = super().parse_args(ctx, args)
        if ctx.args:
            extra = ctx.args[0]
            fix = f"write it as --set {extra}" if "=" in extra else f"see {ctx.command_path} --help"
            raise TransplantError(f"unexpected argument {extra!r}; {fix}")
        return rest


class Group(_UserErrors, click.Group):
    """A click group with the user-error handler; its subcommands default to `Command`."""

    command_class = Command


Group.group_class = Group


def set_option(example: str) -> Callable[[Callable], Callable]:
    """The repeatable `--set KEY=VALUE` option every command takes (parsed by
    `transplant.recipes.parse_assignment` where it is used, so the three commands read it one way)."""
    return click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                        help=f"Override a setting (repeatable), e.g. --set {example}.")


def parse_settings(settings: Iterable[str]) -> dict[str, Any]:
    """`--set` values as {key: YAML-typed value}; a later `--set` of the same key wins."""
    from transplant.recipes import parse_assignment

    return dict(parse_assignment(text) for text in settings)


class DeviceType(click.ParamType):
    """`cpu`, `cuda`, `cuda:N`, `mps` or `auto` (CUDA when torch sees a GPU, else CPU), checked against what
    this torch build can use, so `--device cuda` on a CPU-only install fails before any model loads."""

    name = "device"
    PATTERN = re.compile(r"^(cpu|mps|auto|cuda(:\d+)?)$")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if not self.PATTERN.match(text):
            raise TransplantError(f"--device {value}: not a device; use cpu, cuda, cuda:N, mps or auto")
        if text == "cpu":
            return text
        import torch

        if text == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if text == "mps":
            if not torch.backends.mps.is_available():
                raise TransplantError("--device mps: this torch build sees no Apple GPU; use "
                                      "--device cpu or auto")
            return text
        if not torch.cuda.is_available():
            raise TransplantError(f"--device {text}: this torch build sees no CUDA GPU "
                                  f"(torch {torch.__version__}); use --device cpu or auto")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise TransplantError(f"--device {text}: torch sees {torch.cuda.device_count()} CUDA device(s); "
                                  f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return text


DEVICE = DeviceType()

# Hub options, one spelling for every command that loads a model by name.
REVISION = click.option("--revision", metavar="REV",
                        help="Hub branch, tag or commit of the model (a hub id; refused for local paths).")
TRUST_REMOTE_CODE = click.option(
    "--trust-remote-code", is_flag=True,
    help="Let transformers run code shipped with a hub tokenizer or model (off by default: read it first).")


def read_text_file(path: Path, what: str = "text file") -> str:
    """A UTF-8 file's text, or a one-line error: a binary or unreadable file is the user's to fix."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise TransplantError(f"{what} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                              f"{err.start}); pass a UTF-8 text file") from None
    except OSError as err:
        raise TransplantError(f"cannot read {what} {path}: {err.strerror or err}; pass "
                              "a readable file") from None


def setup_logging(verbose: bool, fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """INFO with `verbose`, else WARNING; the libraries' chatter (and transformers' progress bars) stays
    quiet."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=fmt, datefmt="%H:%M:%S")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def adopt_local_rank(local_rank: int | None) -> None:
    """The deepspeed launcher passes `--local_rank=N` instead of setting LOCAL_RANK; the runtime reads
    LOCAL_RANK."""
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


LOCAL_RANK = click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
                          help="Set by the deepspeed launcher; read from LOCAL_RANK otherwise.")


def relaunch(argv: list[str], nproc: int, port: int = 0) -> int:
    """Run `python -m cli ARGV` under torchrun with `nproc` processes on this machine (a recipe that asks for
    several, started by plain `distill` or `hypernet train`); returns torchrun's exit code."""
    from distill.runtime import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), "-m", "cli", *argv]
    logging.getLogger("cli").info("launching %d processes: %s", nproc, " ".join(command))
    return subprocess.call(command)


def rank() -> int:
    """This process's rank under a launcher (0 without one)."""
    return int(os.environ.get("RANK", "0"))


def setup_rank_logging() -> None:
    """Rank 0 of a training run logs progress; the other ranks only warnings (N copies of a line help
    nobody)."""
    setup_logging(rank() == 0, fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")


PUSH_TO_HUB = click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID",
                           help="Upload the output folder to this Hugging Face Hub repo when done (token: "
                           "HF_TOKEN).")
PRIVATE = click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")


def push_output(folder: Path, repo_id: str | None, private: bool) -> None:
    """Upload `folder` to the hub repo `repo_id` when one was asked for (--push-to-hub), and say where."""
    if repo_id:
        from transplant.io.publish import push_folder

        click.echo(f"  pushed: {push_folder(folder, repo_id, private=private)}")
