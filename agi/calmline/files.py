"""Files calmline writes for an admin (the report, the dialplan snippets), written safely.

The commands may run as root in a directory others can write to: a planted symlink at the
target or at a predictable temporary name must not redirect the write. So the content goes
to a new file with a random name, created with O_EXCL and O_NOFOLLOW in the target's own
directory, which is then renamed over the target (a rename replaces a symlink, it never
follows one). Files that hold caller data are created 0600.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE = 0o600  # caller data: the report
SHARED = 0o644  # read by Asterisk: the dialplan snippets


def write_atomically(path: Path, text: str, mode: int = PRIVATE) -> None:
    """Replace `path` with `text` (UTF-8), created with exactly `mode`, or raise OSError."""
    directory = path.parent
    temp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            fd = -1
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
