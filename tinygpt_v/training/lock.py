"""One run per output folder: an exclusive lock on `<output_dir>/.lock`.

Two runs writing one folder delete each other's checkpoints and interleave their metrics, so
the second one refuses to start. The lock is `fcntl.flock` on an open file: the kernel drops
it when the holding process ends for any reason (exit, exception, SIGKILL, a crashed node
closing its file), so there is never a stale lock to clean up by hand (a killed run leaves the
file behind, unlocked; a clean end removes it). The file holds the holder's pid, host and start
time, which the refusal message quotes.

On a shared file system across nodes, flock is as good as that file system's lock support
(NFSv4 and Lustre honour it; some FUSE mounts do not).
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class OutputDirLocked(RuntimeError):
    """Another run holds the output folder."""


class OutputDirLock:
    """Held from `acquire()` until `release()` (or the end of the process)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._file = None

    def acquire(self) -> "OutputDirLock":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")  # "a+": never truncates the holder's note
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(handle)
                handle.close()
                raise OutputDirLocked(f"{self.output_dir} is in use by another run ({holder}); wait for it to "
                                      f"end or choose another run.output_dir") from None
            if _same_file(handle, self.path):
                break
            handle.close()  # the holder removed the file as we opened it: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        """Remove the file, then unlock: a run that opened it meanwhile sees it is gone and retries."""
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(handle, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _read_holder(handle) -> str:
    handle.seek(0)
    text = handle.read().strip()
    return text or "holder unknown"
