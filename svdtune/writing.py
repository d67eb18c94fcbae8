"""Writing files safely: atomic replacement that keeps the file's mode, never over an input.

`atomic_write` writes a temporary file ``.svdtune-<pid>-<8 hex>.tmp`` in the
destination's folder, fsyncs it and renames it over the destination, so the
destination holds its old content or the complete new file, never a part. The
short temporary name fits next to any valid file name; the pid in it lets a later
write remove what a killed process left (`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable

from svdtune.errors import SvdtuneError

TEMPORARY_PREFIX = ".svdtune-"  # atomic_write's temporary files: .svdtune-<pid>-<8 hex>.tmp
TEMPORARY_NAME = re.compile(r"\.svdtune-([0-9]{1,10})-[0-9a-f]{8}\.tmp")
STALE_SECONDS = 15 * 60  # a temporary file untouched this long, whose process is gone, is removed
_last_scan: dict[str, float] = {}  # folder -> time.monotonic() of its last stale-file scan


def check_destination(path: str | os.PathLike) -> None:
    """Refuse, before any work, a file to write that is not ``*.safetensors`` or cannot be replaced.

    Raises:
        SvdtuneError: the name does not end with ``.safetensors`` (any case).
        OSError: as `atomic_write`, for a missing folder, a folder given as ``path`` or a read-only file.
    """
    name = os.fspath(path)
    if not name.lower().endswith(".safetensors"):
        raise SvdtuneError(f"{name!r} must end with .safetensors: svdtune writes safetensors files; rename the output.")
    _check_folder(name)


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse to write ``out`` over one of ``inputs``: the same file by any path (symlink, hard link, ``..``).

    Files are compared by device and inode (``os.stat``, symlinks followed).

    Raises:
        SvdtuneError: ``out`` is one of the inputs.
    """
    try:
        target = os.stat(out)
    except OSError:
        return  # nothing there yet: nothing to destroy
    for source in inputs:
        with contextlib.suppress(OSError):
            found = os.stat(source)
            if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                raise SvdtuneError(f"the output {os.fspath(out)!r} is the input {os.fspath(source)!r} (the same file), "
                                   "which writing would replace; write the output to another file.")


def _check_folder(path: str) -> os.stat_result | None:
    """Name the user's path (not a temporary file) when the destination cannot be written.

    Returns:
        The stat of the existing file at ``path`` (symlinks followed), or None if there is none.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"its folder {folder!r} does not exist; create it first (mkdir -p)", path)
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(existing.st_mode):
        raise IsADirectoryError(errno.EISDIR, "it is a folder; give a file name inside it", path)
    if not existing.st_mode & 0o222 or not os.access(path, os.W_OK):  # like cp, also for root
        raise PermissionError(errno.EACCES, "it is read-only; make it writable (chmod u+w) or write another file", path)
    return existing


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write a file so that ``path`` is either untouched or complete, never partial.

    The bytes go to a temporary file ``.svdtune-<pid>-<random>.tmp`` in the same folder,
    are flushed to disk (fsync), and the file is renamed over ``path`` (``os.replace``,
    atomic on POSIX and Windows). A file replaced keeps its permission bits (and, where
    allowed, its owner); a new file gets the umask's, as ``open`` gives. On any failure
    the temporary file is removed and the error names ``path``. Temporary files of
    svdtune processes that are gone (killed) are removed from the folder first.

    Raises:
        OSError: naming ``path``: the folder is missing (FileNotFoundError), ``path`` is a
            folder (IsADirectoryError) or read-only (PermissionError), the disk is full, ...
    """
    atomic_write_all({path: chunks})


def atomic_write_all(files: dict[str | os.PathLike, Iterable[bytes | memoryview]]) -> None:
    """`atomic_write` for files that belong together (an adapter and its config): every destination is
    checked, then every file is written to its temporary file, and only when all are complete are they
    renamed, in order. A failure before the renames leaves every destination untouched.

    Raises:
        OSError: as `atomic_write`, naming the destination that failed.
    """
    paths = {os.fspath(path): chunks for path, chunks in files.items()}
    existing = {path: _check_folder(path) for path in paths}
    staged: list[tuple[str, str]] = []  # (temporary, destination)
    try:
        for path, chunks in paths.items():
            staged.append((_staged(path, chunks, existing[path]), path))
        for temporary, path in staged:
            try:
                os.replace(temporary, path)
            except OSError as error:
                raise _naming(error, path) from None
    except BaseException:
        for temporary, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise
    for folder in {os.path.dirname(os.path.abspath(path)) for path in paths}:
        _sync_folder(folder)


def _staged(path: str, chunks: Iterable[bytes | memoryview], existing: os.stat_result | None) -> str:
    """A complete, fsynced temporary file beside ``path`` holding ``chunks``, with the mode ``path`` gets."""
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(folder)
    try:
        descriptor, temporary = _create_temporary(folder, private=existing is not None)
    except OSError as error:
        raise _naming(error, path) from None
    try:
        with os.fdopen(descriptor, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
            stream.flush()
            if existing is not None:
                _keep_owner_and_mode(descriptor, existing)
            os.fsync(descriptor)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise _naming(error, path) from None
        raise
    return temporary


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse, before any work, a destination that `atomic_write` could not replace (a folder, a
    read-only file, a missing folder); see `check_destination` for delta files.

    Raises:
        OSError: naming ``path``.
    """
    _check_folder(os.fspath(path))


def _create_temporary(folder: str, private: bool) -> tuple[int, str]:
    """A new, empty temporary file in ``folder``: (descriptor, path).

    ``private`` (0600) when it will replace a file whose mode is copied in later; else
    created 0666 so that the umask (and a default ACL) apply as for any new file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        temporary = os.path.join(folder, f"{TEMPORARY_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, flags, 0o600 if private else 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", folder)


def _keep_owner_and_mode(descriptor: int, existing: os.stat_result) -> None:
    """Give the new file the owner (where allowed, e.g. for root) and permission bits of the one it replaces."""
    if hasattr(os, "fchown") and (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(OSError):
            os.fchown(descriptor, existing.st_uid, existing.st_gid)
    if hasattr(os, "fchmod"):
        os.fchmod(descriptor, stat.S_IMODE(existing.st_mode) & 0o777)  # never set-id bits


def _naming(error: OSError, path: str) -> OSError:
    """``error`` about ``path``: same errno and type, the user's file name instead of a temporary or none."""
    if error.filename == path and error.filename2 is None:
        return error
    return OSError(error.errno, error.strerror or str(error), path)  # OSError(errno, ...) picks the subclass


def remove_stale_temporaries(folder: str) -> None:
    """Remove svdtune's temporary files that a killed process left in ``folder`` (POSIX only, best effort).

    A file is stale when its name is ``.svdtune-<pid>-<8 hex>.tmp``, it is a regular file
    owned by this user, it has not been modified for `STALE_SECONDS`, and no process
    <pid> runs on this machine. A folder is scanned at most once a minute per process.
    """
    now = time.monotonic()
    if os.name != "posix" or now - _last_scan.get(folder, -math.inf) < 60:
        return
    _last_scan[folder] = now
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            match = TEMPORARY_NAME.fullmatch(entry.name)
            if match is None or int(match[1]) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                old = time.time() - info.st_mtime > STALE_SECONDS
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and old and not _running(int(match[1])):
                    os.unlink(entry.path)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (POSIX: signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (no process has a pid beyond a C int)
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable where the OS allows it (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
