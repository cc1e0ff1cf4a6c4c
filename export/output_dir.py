"""Atomic output directories: an export is assembled in a sibling staging dir and renamed into place only
when complete, so a failed export leaves nothing behind (torch-free: the TensorRT builder uses it too)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from runtime.errors import UserError
from runtime.manifest import MANIFEST_FILE


def check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise UserError(f"{out} exists and is not an export directory; choose another --out or remove it")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty staging dir next to `out`; on success it replaces `out` (an earlier export there,
    even one the staging dir holds hard links into, is removed only at that moment)."""
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        yield Path(staging)
        final = Path(tempfile.mkdtemp(prefix=f".{out.name}.done.", dir=out.parent))
        final.rmdir()
        Path(staging).rename(final)
        if out.exists():
            shutil.rmtree(out)
        final.rename(out)
        Path(staging).mkdir()  # TemporaryDirectory removes the (now empty) staging path
