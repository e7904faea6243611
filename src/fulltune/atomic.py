"""Publish files and directories atomically: ranks and jobs working at once never see half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Write `text` through a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextmanager
def publish_dir(target: Path) -> Iterator[Path]:
    """Yield an empty directory beside `target` to fill; it becomes `target` when the block ends.

    When another process published `target` first (same inputs, same contents), its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, target)
    except OSError:  # another process published it first
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk, so a rename that publishes it survives a machine crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_path(src: Path, dst: Path) -> None:
    """Move the finished file or directory `src` to `dst` in one rename. A directory `dst` that exists
    is first renamed aside (a hidden `.<name>.old`) and removed after: at no moment does `dst` name a
    mix of old and new files."""
    if src.is_file():
        fsync_file(src)
    if dst.is_dir() and not dst.is_symlink():
        aside = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)


def remove_path(path: Path) -> None:
    """Remove a file or directory in one rename first (to a hidden `.<name>.deleting`), so a crash while a
    large directory is deleted never leaves half of it under its real name."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    else:
        path.unlink()
