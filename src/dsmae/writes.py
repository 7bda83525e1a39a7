"""Writing files so that a failure is a message, never a half-written file.

Libraries wrap the operating system's error: ``torch.save`` on a full disk raises
``RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos`` with the
``OSError: [Errno 28]`` only as its cause, and TensorBoard's writer raises from its
background thread at a later call. :func:`os_error_behind` digs the ``OSError`` out, and
:class:`WriteError` carries one sentence naming what could not be written and why.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from dsmae.config import ConfigError

LOW_SPACE_BYTES = 1 << 20  # a folder with less free space than this counts as full
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the permissions a file created with open() would have
FILE_MODE = 0o666 & ~_UMASK


class WriteError(OSError):
    """A file could not be written (full disk, read-only folder, ...); the message says
    which file and why, and that nothing half-written was left behind."""


def os_error_behind(err: BaseException) -> OSError | None:
    """``err`` itself if it is an ``OSError``, else the first one in its chain of causes
    and contexts; None if there is none."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def disk_full(folder: str | Path) -> bool:
    """Whether the file system of ``folder`` (or its nearest existing parent) is full."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free < LOW_SPACE_BYTES
    except OSError:
        return False


def reason(err: BaseException, path: str | Path) -> str | None:
    """Why writing ``path`` failed, in words (e.g. "No space left on device"), when
    ``err`` is (or wraps) an operating-system error or the disk is full; None when it is
    something else, a bug to let through."""
    os_err = os_error_behind(err)
    if os_err is not None:
        return os_err.strerror or str(os_err)
    if disk_full(Path(path).parent):
        return os.strerror(28)  # "No space left on device", from a library's own error
    return None


@contextlib.contextmanager
def written(what: str, path: str | Path) -> Iterator[None]:
    """Turn a failed write of ``path`` in the body into a :class:`WriteError` that names
    ``what`` ("checkpoint", "metrics", ...) and the reason; other errors pass through."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as err:
        why = reason(err, path)
        if why is None:
            raise
        raise WriteError(f"could not write {what} {path}: {why}") from err


@contextlib.contextmanager
def replacing(path: str | Path, what: str = "file") -> Iterator[IO[bytes]]:
    """A new file that replaces ``path`` when the body ends: written under a hidden
    temporary name beside it that nobody can predict, created exclusively (a file or link
    planted there is never opened), flushed to disk and renamed over ``path``, so that
    ``path`` holds either its old content or the new one. A failure leaves no temporary
    file; its ``OSError`` passes through (wrap the call in :func:`written`).

    Raises:
        WriteError: ``path`` is a link: a command writes its own files, never through
            (or over) a link a user or another process put in their place.
    """
    path = Path(path)
    if path.is_symlink():
        raise WriteError(
            f"could not write {what} {path}: it is a link; remove it, or write elsewhere"
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # as open() would create it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # gone after the rename
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes, what: str = "file") -> Path:
    """Write ``data`` to ``path`` through :func:`replacing`: ``path`` holds either its old
    content or the new one, never part.

    Raises:
        WriteError: the write failed (nothing is left behind), or ``path`` is a link.
    """
    path = Path(path)
    with written(what, path), replacing(path, what) as f:
        f.write(data)
    return path


def write_figure(figure: Any, path: str | Path, what: str = "figure", **options: Any) -> Path:
    """A matplotlib ``figure`` saved to ``path`` (its format from the extension) through
    :func:`atomic_write_bytes`: never through a link, never half-written."""
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix[1:].lower() or None, **options)
    return atomic_write_bytes(path, buffer.getvalue(), what)


def append_only(path: str | Path, what: str = "file") -> IO[str]:
    """``path`` opened to append text, line-buffered; created if need be, but never
    through a link.

    Raises:
        WriteError: it is a link, or cannot be opened.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    with written(what, path):
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise WriteError(
                f"could not write {what} {path}: it is a link; remove it, or write elsewhere"
            ) from None
    return os.fdopen(fd, "a", buffering=1)


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode(), what)


def unwritable_reason(folder: str | Path) -> str | None:
    """Why files cannot be written into ``folder`` (created if need be), found by writing
    one; None when they can. What a command checks before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")  # a name of its own
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or str(err)
    return None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether the paths ``a`` and ``b`` name one file (links and ``..`` followed)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def check_output_file(
    out: str | Path,
    flag: str,
    what: str,
    *,
    inputs: Sequence[str | Path] = (),
    overwrite: bool | None = None,
) -> Path:
    """Refuse, before any work, an output file ``out`` (given as ``flag``, e.g. "--out")
    that would replace one of the command's ``inputs``, that exists already (where
    ``overwrite`` is False; None: replacing it is fine), or whose folder cannot be
    written. Returns ``out`` as a Path.

    Raises:
        ConfigError: it is an input, a folder, or exists without ``overwrite``.
        WriteError: its folder cannot be written.
    """
    out = Path(out)
    for source in inputs:
        if same_file(out, source):
            raise ConfigError(
                f"{flag} {out} is an input of this command ({source}): give another file", flag
            )
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a folder; give a file name", flag)
    if overwrite is False and out.exists():
        raise ConfigError(
            f"{flag} {out} exists; pass --overwrite to replace it, or give another file", flag
        )
    why = unwritable_reason(out.parent)
    if why is not None:
        raise WriteError(f"could not write {what} {out}: {why}")
    return out
