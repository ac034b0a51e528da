"""One writer per folder: an exclusive lock a training run (or a cache build) holds on its folder
for as long as it writes there.

    with FolderLock(run_dir, purpose="training run"):   # before "does the folder hold a run?"
        ...

The lock is `flock` on `<folder>/.jaxdiff.lock`: the kernel releases it when the process exits,
however it exits, so a lock left by a killed run is never stale. The file records the holder's
host and process id, which the second writer's error names. (`flock` is advisory and
host-local on some network file systems; a multi-host run takes it on the main process only.)
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from jaxdiff.errors import JaxdiffError

LOCK_NAME = ".jaxdiff.lock"


class FolderLock:
    """An exclusive lock on `folder` (created if missing), held on its file `lock_name`.
    `wait_s`: how long to wait for another holder to let go (0: fail at once with one clear
    error naming the holder, `purpose` and `hint`)."""

    def __init__(self, folder: str | os.PathLike, *, purpose: str = "run", hint: str = "",
                 wait_s: float = 0.0, lock_name: str = LOCK_NAME):
        self.folder = Path(folder).expanduser().absolute()
        self.purpose, self.hint, self.wait_s, self.lock_name = purpose, hint, wait_s, lock_name
        self._fd: int | None = None
        self._created = False

    @property
    def path(self) -> Path:
        return self.folder / self.lock_name

    def acquire(self) -> "FolderLock":
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    where = self.folder if self.lock_name == LOCK_NAME else self.path
                    raise JaxdiffError(f"{where} is in use by another {self.purpose} ({holder}); "
                                       f"wait for it to finish{self.hint}") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go; a folder this lock created and nothing else was written to goes too."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        if self._created and [p.name for p in self.folder.iterdir()] == [self.lock_name]:
            self.path.unlink()
            self.folder.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return f"host {text}" if text else "holder unknown"
