"""Publishing a result directory whole: written aside, moved into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def publish_dir(out_dir: Path, write: Callable[[Path], T]) -> T:
    """Run ``write(tmp)`` on a fresh hidden sibling of ``out_dir``, then move it to ``out_dir`` (replacing an
    earlier result there). If ``write`` fails the sibling is removed, so an interrupted run never leaves a result
    that looks complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        result = write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    partial.chmod(0o777 & ~umask)  # mkdtemp makes it private; a result directory is an ordinary one
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return result
