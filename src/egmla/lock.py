"""One writer per folder: an OS advisory lock on `<folder>/.lock` (fcntl.flock), held while a process writes.

The kernel drops the lock when its holder exits, however it dies (SIGKILL included), so a lock is never stale;
the file keeps the holder's PID and host for the refusal message. A lock belongs to one open file, so a second
`hold()` of the same folder refuses even in the same process. Without fcntl (Windows) nothing is locked.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".lock"


class FolderLocked(Exception):
    """Another process writes into the folder: reported in one line, exit status 2."""


@contextmanager
def hold(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """Create `folder` if needed and hold its lock until the block ends; FolderLocked if another holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    with open(path, "a+") as f:  # "a+": opening must not wipe the holder's PID before we know we hold the lock
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise FolderLocked(
                    f"{what} {folder} is in use by {holder} (lock {path}): wait for it to finish or stop it, "
                    "or use another folder"
                ) from None
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield path
