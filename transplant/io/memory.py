"""Refuse work that cannot fit in memory before allocating it.

An option that asks for too much (`--set k=100000000`) used to surface as a multi-terabyte allocation and a
traceback, or as the kernel's OOM killer. Solvers estimate what they must hold at once and call `check_fits`
first; the estimate is compared with what the machine (or its cgroup, in a container) has available now.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from transplant.errors import TransplantError

log = logging.getLogger(__name__)

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) reads as None


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory free for new allocations on `device` now: the GPU's free memory, or on CPU the host's
    MemAvailable capped by the cgroup's headroom; None when it cannot be read (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    candidates = [_host_available()]
    for limit_file, usage_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            candidates.append(max(limit - usage, 0))
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def check_fits(needed_bytes: int, *, what: str, fix: str, device: str | torch.device = "cpu",
               headroom: float = 0.9) -> None:
    """Raise a one-line `TransplantError` if `needed_bytes` exceed `headroom` of the available memory.

    `what` names the allocation ("OMP coefficients for 200000 tokens at k=4096"), `fix` what the user can do
    ("use a smaller --set k"). Call it before allocating; an unknown amount of free memory refuses nothing."""
    free = available_bytes(device)
    if free is None or needed_bytes <= headroom * free:
        return
    raise TransplantError(f"{what} needs {needed_bytes / 2**30:.1f} GiB but {torch.device(device).type} has "
                          f"{free / 2**30:.1f} GiB available; {fix}")


def omp_bytes(n_targets: int, n_anchors: int, dim: int, k: int, batch_size: int = 1) -> int:
    """A lower bound on what `transplant.solvers.omp.omp` holds at once: indices (int64) and float32
    coefficients for every target, the unit-normalised anchors, and the working set of `batch_size` targets
    in flight, about N·(k + 8) floats each (the solver's docstring; its automatic batch size only grows
    it)."""
    steps = min(k, n_anchors)
    results = n_targets * k * (8 + 4)
    anchors = n_anchors * dim * 4
    working = min(batch_size, n_targets) * n_anchors * (steps + 8) * 4
    return results + anchors + working
