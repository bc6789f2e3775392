"""Pure-Python fallback for :mod:`fastbackup._native`.

Selected with ``FASTBACKUP_PURE_PYTHON=1`` (see ``fastbackup._compat``), for
platforms where the C extension cannot be built. Same API and the same
crash-safety protocol as the extension:

* ``crc32c(data, value=0)``: CRC-32C (Castagnoli). Correct but slow (a few
  MB/s; the extension does over 10 GB/s), one table lookup per byte.
* ``crc32c_copy(dst, src, value=0)``: copies ``src`` into ``dst`` (the same
  size) and returns ``crc32c(src, value)``; the extension does both in one
  pass over ``src``. Overlapping buffers are copied as by ``memmove`` here,
  where the extension refuses them.
* ``AtomicFile(directory, final_name, *, sync=True, direct=False)``: write
  ``.{final_name}.{16 hex}.tmp`` next to the final name, then ``commit()``
  fdatasyncs, closes, renames it over ``final_name`` and fsyncs the directory.
  ``direct`` is accepted and ignored: this fallback always writes through the
  page cache (O_DIRECT needs aligned memory, which Python cannot hand to
  ``os.write`` without an extra copy), so the ``direct`` property is always
  False, as the extension reports when the filesystem refuses O_DIRECT.
* ``set_failpoint(op, nth, errno)`` / ``clear_failpoints()``: test-only fault
  injection, process-wide, with the extension's semantics.

The reasons behind each step (fsync before rename, directory fsync, never
retrying a failed fsync) are commented in ``native/atomic_file.c``.
"""

from __future__ import annotations

import errno as _errno
import operator
import os
import threading
from typing import Any, Iterable

try:
    import fcntl as _fcntl
except ImportError:  # Windows
    _fcntl = None

__all__ = [
    "AtomicFile", "clear_failpoints", "crc32c", "crc32c_copy", "set_failpoint",
]

_POLY = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def _as_bytes_view(obj: Any) -> memoryview:
    view = memoryview(obj)
    if not view.c_contiguous:
        view.release()
        raise BufferError("buffer is not C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def crc32c(data: Any, value: int = 0) -> int:
    """CRC-32C of a C-contiguous buffer, continuing from ``value``."""
    value = operator.index(value)
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError("value must be in range(0, 2**32)")
    table = _TABLE
    crc = value ^ 0xFFFFFFFF
    with _as_bytes_view(data) as view:
        for byte in view:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c_copy(dst: Any, src: Any, value: int = 0) -> int:
    """Copies ``src`` into ``dst`` and returns ``crc32c(src, value)``."""
    with _as_bytes_view(dst) as out, _as_bytes_view(src) as data:
        if out.readonly:
            raise TypeError("dst must be a writable buffer")
        if len(out) != len(data):
            raise ValueError(
                "dst and src must have the same size. Received: "
                f"len(dst)={len(out)}, len(src)={len(data)}"
            )
        crc = crc32c(data, value)
        out[:] = data
    return crc


# --- failpoints -------------------------------------------------------------

_FAILPOINT_OPS = ("open", "write", "fsync", "close", "rename", "dirfsync")
_fp_lock = threading.Lock()
_fp_countdown: dict[str, int] = {}
_fp_errno: dict[str, int] = {}
_fp_write_cap = 0
_fp_armed = False


def set_failpoint(op: str, nth: int, errno: int) -> None:
    """Make the nth future call of ``op`` fail with ``errno`` (test only).

    ``op`` is one of "open", "write", "fsync", "close", "rename", "dirfsync";
    "short_write" instead caps every write at ``nth`` bytes.
    """
    global _fp_write_cap, _fp_armed
    if not isinstance(op, str):
        raise TypeError("op must be a str")
    nth = operator.index(nth)
    errno = operator.index(errno)
    if nth < 1:
        raise ValueError("nth must be >= 1")
    if op != "short_write" and op not in _FAILPOINT_OPS:
        raise ValueError(
            f"unknown failpoint {op!r}; expected one of 'open', 'write', "
            "'fsync', 'close', 'rename', 'dirfsync', 'short_write'"
        )
    if op != "short_write" and errno <= 0:
        raise ValueError("errno must be a positive errno value")
    with _fp_lock:
        if op == "short_write":
            _fp_write_cap = nth
        else:
            _fp_errno[op] = errno
            _fp_countdown[op] = nth
        _fp_armed = True


def clear_failpoints() -> None:
    """Remove every failpoint and the short-write cap."""
    global _fp_write_cap, _fp_armed
    with _fp_lock:
        _fp_armed = False
        _fp_write_cap = 0
        _fp_countdown.clear()
        _fp_errno.clear()


def _fp_hit(op: str) -> int:
    if not _fp_armed:
        return 0
    with _fp_lock:
        left = _fp_countdown.get(op, 0)
        if left <= 0:
            return 0
        _fp_countdown[op] = left - 1
        return _fp_errno[op] if left == 1 else 0


def _fp_cap(length: int) -> int:
    if not _fp_armed or _fp_write_cap == 0:
        return length
    return min(length, _fp_write_cap)


# --- AtomicFile -------------------------------------------------------------

_CHUNK_SIZE = 4 << 20
_MAX_WRITE = 1 << 30
_TEMP_ATTEMPTS = 8
_OPEN_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)

_OPEN, _COMMITTED, _ABORTED = 0, 1, 2


def _oserror(err: int, filename: str, filename2: str | None = None) -> OSError:
    if filename2 is None:
        return OSError(err, os.strerror(err), filename)
    return OSError(err, os.strerror(err), filename, None, filename2)


def _sync_data(fd: int) -> None:
    full = getattr(_fcntl, "F_FULLFSYNC", None)
    if full is not None:
        # macOS fsync does not flush the drive cache; F_FULLFSYNC does.
        try:
            _fcntl.fcntl(fd, full)
            return
        except OSError:
            pass
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def _sync_directory(directory: str) -> None:
    injected = _fp_hit("dirfsync")
    if injected:
        raise _oserror(injected, directory)
    if os.name == "nt":
        # Windows cannot open a directory for fsync; NTFS journals renames.
        return
    dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                  | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(dfd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory at all (PostgreSQL's
        # fsync_fname_ext ignores the same two errors).
        if exc.errno not in (_errno.EINVAL, _errno.EBADF):
            raise _oserror(exc.errno, directory) from None
    finally:
        os.close(dfd)


def _is_single_buffer(obj: Any) -> bool:
    try:
        memoryview(obj).release()
    except TypeError:
        return False
    return True


class AtomicFile:
    """Write a file crash-safely; see the module docstring."""

    __slots__ = (
        "_fd", "_state", "_sync", "_lock", "_bytes_written",
        "_dir", "_temp_path", "_final_path",
    )

    def __init__(self, directory: str | os.PathLike[str], final_name: str,
                 *, sync: bool = True, direct: bool = False) -> None:
        # `direct` is ignored on purpose; see the module docstring.
        self._state = _ABORTED  # nothing for __del__ to remove yet
        self._fd = -1
        self._lock = threading.Lock()
        self._bytes_written = 0
        self._sync = bool(sync)
        directory = os.fsdecode(os.fspath(directory))
        if not isinstance(final_name, str):
            raise TypeError(f"final_name must be str, not {type(final_name).__name__}")
        if (final_name in ("", ".", "..") or "/" in final_name or "\0" in final_name
                or (os.sep != "/" and os.sep in final_name)):
            raise ValueError(
                "final_name must be a plain file name: not empty, '.' or '..', "
                "and without '/' or NUL"
            )
        if "\0" in directory:
            raise ValueError("embedded null byte")
        self._dir = directory or "."
        self._final_path = os.path.join(directory, final_name)
        for _ in range(_TEMP_ATTEMPTS):
            self._temp_path = os.path.join(
                directory, f".{final_name}.{os.urandom(8).hex()}.tmp")
            injected = _fp_hit("open")
            try:
                if injected:
                    raise _oserror(injected, self._temp_path)
                self._fd = os.open(self._temp_path, _OPEN_FLAGS, 0o644)
            except FileExistsError:
                continue
            except OSError as exc:
                raise _oserror(exc.errno, self._temp_path) from None
            self._state = _OPEN
            return
        raise _oserror(_errno.EEXIST, self._temp_path)

    # -- properties --------------------------------------------------------
    @property
    def temp_path(self) -> str:
        return self._temp_path

    @property
    def final_path(self) -> str:
        return self._final_path

    @property
    def bytes_written(self) -> int:
        return self._bytes_written

    @property
    def direct(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._state != _OPEN

    @property
    def committed(self) -> bool:
        return self._state == _COMMITTED

    # -- internals ---------------------------------------------------------
    def _check_usable(self) -> None:
        if self._state == _COMMITTED:
            raise ValueError("AtomicFile is closed (already committed)")
        if self._state == _ABORTED:
            raise ValueError("AtomicFile is closed (aborted)")

    def _acquire(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("AtomicFile is in use by another thread")

    def _discard_temp(self) -> int:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        try:
            os.unlink(self._temp_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            return exc.errno or _errno.EIO
        return 0

    def _write_all(self, view: memoryview) -> None:
        off, end = 0, len(view)
        while off < end:
            n = _fp_cap(min(end - off, _MAX_WRITE))
            injected = _fp_hit("write")
            if injected == _errno.EINTR:
                continue
            if injected:
                raise _oserror(injected, self._temp_path)
            done = os.write(self._fd, view[off:off + n])
            if done == 0:
                raise _oserror(_errno.EIO, self._temp_path)
            off += done
            self._bytes_written += done

    # -- API ---------------------------------------------------------------
    def write(self, buffers: Iterable[Any], *, checksum: bool = True) -> list[int]:
        """Write each buffer in order; return the CRC-32C of each."""
        self._check_usable()
        if _is_single_buffer(buffers):
            raise TypeError(
                "write() takes a sequence of buffers; wrap a single buffer in a list")
        self._acquire()
        views: list[memoryview] = []
        try:
            for buf in buffers:
                views.append(_as_bytes_view(buf))
            crcs: list[int] = []
            try:
                for view in views:
                    if not checksum:
                        self._write_all(view)
                        continue
                    crc = 0
                    for start in range(0, len(view), _CHUNK_SIZE):
                        chunk = view[start:start + _CHUNK_SIZE]
                        crc = crc32c(chunk, crc)
                        self._write_all(chunk)
                    crcs.append(crc)
            except OSError as exc:
                self._discard_temp()
                self._state = _ABORTED
                raise _oserror(exc.errno or _errno.EIO, self._temp_path) from None
            return crcs
        finally:
            for view in views:
                view.release()
            self._lock.release()

    def commit(self) -> None:
        """fdatasync, close, rename into place, fsync the directory."""
        self._check_usable()
        self._acquire()
        try:
            try:
                if self._sync:
                    # Never retried: after a failed fsync the kernel may have
                    # marked the pages clean (fsyncgate).
                    injected = _fp_hit("fsync")
                    if injected:
                        raise _oserror(injected, self._temp_path)
                    _sync_data(self._fd)
                fd, self._fd = self._fd, -1
                injected = _fp_hit("close")
                if injected:
                    os.close(fd)
                    raise _oserror(injected, self._temp_path)
                os.close(fd)
            except OSError as exc:
                self._discard_temp()
                self._state = _ABORTED
                raise _oserror(exc.errno or _errno.EIO, self._temp_path) from None
            try:
                injected = _fp_hit("rename")
                if injected:
                    raise _oserror(injected, self._temp_path, self._final_path)
                os.replace(self._temp_path, self._final_path)
            except OSError as exc:
                self._discard_temp()
                self._state = _ABORTED
                raise _oserror(exc.errno or _errno.EIO, self._temp_path,
                               self._final_path) from None
            self._state = _COMMITTED
            if self._sync:
                try:
                    _sync_directory(self._dir)
                except OSError as exc:
                    raise _oserror(exc.errno or _errno.EIO, self._dir) from None
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Close and remove the temporary file; no-op once finished."""
        if self._state != _OPEN:
            return
        self._acquire()
        try:
            self._state = _ABORTED
            err = self._discard_temp()
        finally:
            self._lock.release()
        if err:
            raise _oserror(err, self._temp_path)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc_info: object) -> bool:
        self.abort()
        return False

    def __del__(self) -> None:
        if getattr(self, "_state", _ABORTED) == _OPEN:
            self._state = _ABORTED
            self._discard_temp()

    def __repr__(self) -> str:
        state = ("open", "committed", "aborted")[self._state]
        return f"<fastbackup AtomicFile {self._final_path!r} ({state})>"
