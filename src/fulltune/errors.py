"""How an error a user caused ends a run: its message alone on stderr and exit code 2.

A stack trace helps whoever debugs fulltune, not whoever gave it a bad file or flag, so user errors
(`ConfigError` and its kinds: `DataError`, `FormatError`, `ModelSpecError`; the OS errors of paths a
user chose: missing, unreadable, read-only, full) print one message naming what to fix. `debug=true`
or `HYDRA_FULL_ERROR=1` show the trace; anything else is a bug and keeps its trace.
"""

from __future__ import annotations

import errno
import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from fulltune.preflight import ConfigError

USER_ERROR_EXIT = 2
OS_ERROR_FIXES = {
    errno.ENOENT: "it does not exist: check the path in the config",
    errno.EISDIR: "it is a directory where a file is expected",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EACCES: "fix its permissions, or point the config key that names it at a path this user can use",
    errno.EPERM: "fix its permissions, or point the config key that names it at a path this user can use",
    errno.EROFS: "the file system is read-only: point paths.log_dir / paths.output_dir (outputs) or "
                 "paths.cache_dir (caches) at a writable disk",
    errno.ENOSPC: "free space there, or point paths.log_dir / paths.output_dir (outputs, checkpoints) or "
                  "paths.cache_dir (token caches, converted models) at a disk with room",
    errno.EDQUOT: "the disk quota is used up: free space, or point paths.log_dir / paths.cache_dir elsewhere",
}


def user_error_message(err: BaseException) -> str | None:
    """The message to print for an error the user caused, None for anything else (a bug). Hydra's
    `instantiate` wraps what a constructor raised (`InstantiationException` from it): the cause counts."""
    while not isinstance(err, ConfigError | OSError | pickle.UnpicklingError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):  # torch.load(weights_only=True)
        reason = next((line for line in str(err).splitlines() if "Unsupported" in line), str(err).splitlines()[0])
        return (f"a checkpoint holds objects that only running code from it could rebuild, so it was not loaded "
                f"({reason.strip()}). fulltune loads checkpoints with weights_only=True; resume only from "
                "checkpoints fulltune wrote, or convert yours to safetensors")
    if isinstance(err, OSError) and err.errno in OS_ERROR_FIXES:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}; {OS_ERROR_FIXES[err.errno]}"
    return None


def traces_wanted(debug: bool = False) -> bool:
    """`debug=true` or Hydra's own switch for full traces."""
    return debug or os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextmanager
def exit_on_user_error(debug: bool = False) -> Iterator[None]:
    """Turn a user error raised in the block into its message and exit code 2 (unless traces are wanted)."""
    try:
        yield
    except Exception as err:
        message = user_error_message(err)
        if message is None or traces_wanted(debug):
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
