"""Files written whole and read only from inside their folder: every file this package writes goes
through a temporary file beside it, renamed into place (a reader never sees half a file, and a
link planted at the file's name is replaced, not written through); a load refuses a file that is
a link out of the folder it was given."""
from __future__ import annotations

import contextlib
import os
import secrets


def _open_temporary(path: str):
    """(fd, name) of a new file beside ``path``, created exclusively (never an existing file or link)."""
    directory, name = os.path.split(path)
    while True:
        temporary = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666), \
                temporary
        except FileExistsError:
            continue


def write_bytes(data: bytes, path: str) -> None:
    """``data`` into ``path``: written to a temporary file beside it, then renamed over it (which
    replaces a link at ``path`` rather than writing where it points); removed on error."""
    fd, temporary = _open_temporary(os.fspath(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_text(text: str, path: str) -> None:
    """``text`` (UTF-8) into ``path``, renamed into place."""
    write_bytes(text.encode("utf-8"), path)


def check_inside(path: str, folder: str) -> str:
    """``path``, unless it is (or goes through) a link leading out of ``folder``: a load reads only
    what lies in the folder it was given."""
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([os.path.realpath(path), real_folder]) != real_folder:
        raise ValueError(f"{path} is a link out of {folder}: refusing to read it")
    return path


__all__ = ["check_inside", "write_bytes", "write_text"]
