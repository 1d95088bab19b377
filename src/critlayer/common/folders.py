"""Result folders: refuse to clobber earlier results, never leave one half-written, write from one process.

Every result critlayer saves (a scan, a comparison, a fine-tune, a validation, a defence, a prune, a quantization)
is a ``SavedResult``: a JSON file that names the folder's kind, beside the plots and pages it writes, and that
``load`` reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

from .errors import CritlayerError


def check_output_folder(folder: str | Path, marker: str, force: bool) -> None:
    """Refuse to overwrite a folder holding earlier results unless ``force``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CritlayerError(f"output path {folder} exists and is not a folder")
    if (folder / marker).exists() and not force:
        raise CritlayerError(f"{folder} already holds a {marker}; pass --force to overwrite it")


def check_model_folder(folder: Path, force: bool) -> None:
    """An output that holds a whole model: refuse any folder with files in it, unless ``force``."""
    if folder.exists() and not folder.is_dir():
        raise CritlayerError(f"output path {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise CritlayerError(f"{folder} is not empty; pass --force to write the model into it")


class staged_folder:
    """Write into a hidden sibling folder, then move it into place: never a half-written output."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __enter__(self) -> Path:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=f".{self.folder.name}-"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.folder.exists():  # an earlier run's folder (with --force): replace our files only
            for item in self.tmp.iterdir():
                target = self.folder / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
            self.tmp.rmdir()
        else:
            os.replace(self.tmp, self.folder)


def write_atomically(path: Path, text: str) -> None:
    """Write a file through a hidden sibling, so it is either the old one or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_result_json(path: str | Path, file_name: str, kind: str) -> dict:
    """The JSON object a result folder (or the file itself) holds; one line of error where there is none."""
    path = Path(path)
    file = path / file_name if path.is_dir() else path
    if not file.is_file():
        raise CritlayerError(f"no {kind} found at {path}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSON and Unicode errors are ValueErrors
        raise CritlayerError(f"{file} is not a critlayer {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise CritlayerError(f"{file} is not a critlayer {kind}: not a JSON object")
    return data


class SavedResult:
    """A result that saves as a folder: ``FILE`` (its JSON, ``to_json()``) and whatever ``write_files`` adds, and
    reloads from it (``load``, through ``from_json``).

    ``save`` writes atomically, refuses an earlier result of the same kind without ``force``, and writes
    from the main process only when several run (``accelerate launch``). A subclass names its file and what it is
    called in messages as it is declared: ``class ScanResult(SavedResult, file="scan.json", kind="scan")``.
    """

    FILE: ClassVar[str]
    KIND: ClassVar[str]

    def __init_subclass__(cls, *, file: str | None = None, kind: str | None = None, **options):
        super().__init_subclass__(**options)
        cls.FILE = file or getattr(cls, "FILE", None)
        cls.KIND = kind or getattr(cls, "KIND", None)

    def to_json(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: dict):
        raise CritlayerError(f"a {cls.KIND} is written for reading, not read back")

    @classmethod
    def load(cls, path: str | Path):
        """Reload a result from its folder or its JSON file (plots and model weights are not read back)."""
        data = read_result_json(path, cls.FILE, cls.KIND)
        try:
            return cls.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise CritlayerError(f"{path} is not a critlayer {cls.KIND}: {exc!r}") from None

    def write_files(self, folder: Path) -> None:
        """Plots, pages and other files beside the JSON (none by default)."""

    def save(self, folder: str | Path, *, force: bool = False) -> Path:
        from .distributed import is_main

        folder = Path(folder)
        check_output_folder(folder, self.FILE, force)
        if not is_main():
            return folder
        with staged_folder(folder) as tmp:
            self.write_files(tmp)  # first: what writing files finds (a GGUF file read back) goes into the JSON
            (tmp / self.FILE).write_text(json.dumps(self.to_json(), indent=1))
        return folder
