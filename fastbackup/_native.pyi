"""Type stub for the C extension fastbackup._native: durable file writes and CRC-32C."""

# Mirrors the PyMethodDef, PyGetSetDef and module-init tables of
# native/module.c and native/atomic_file.c (crc32c.c and failpoint.c expose
# nothing to Python directly). Keyword names are those of each kwlist.
# fastbackup/_pynative.py is the pure-Python fallback with the same API.

from collections.abc import Iterable
from types import TracebackType
from typing import Final, Literal, Self, SupportsIndex, final

# _typeshed exists only for type checkers (never imported at runtime). Its
# ReadableBuffer is any object with the buffer protocol, numpy arrays and
# mmap included; collections.abc.Buffer is not in typeshed for Python 3.11.
from _typeshed import ReadableBuffer, StrOrBytesPath, WriteableBuffer

_crc32c_impl: Final[Literal["sse4.2", "slicing-by-8"]]
"""Name of the CRC-32C implementation chosen for this CPU (diagnostics)."""

def crc32c(data: ReadableBuffer, value: SupportsIndex = ...) -> int:
    """CRC-32C (Castagnoli) of a C-contiguous buffer, continuing from a previous result `value`."""

def _crc32c_portable(data: ReadableBuffer, value: SupportsIndex = ...) -> int:
    """crc32c() forced onto the portable slicing-by-8 table path, for tests."""

def crc32c_copy(
    dst: WriteableBuffer, src: ReadableBuffer, value: SupportsIndex = ...
) -> int:
    """Copy `src` into `dst` (same size, no overlap; stores bypass the cache) and return crc32c(src, value), reading `src` once."""

def _crc32c_copy_portable(
    dst: WriteableBuffer, src: ReadableBuffer, value: SupportsIndex = ...
) -> int:
    """crc32c_copy() forced onto the portable path (memcpy in cache-sized pieces), for tests."""

def set_failpoint(op: str, nth: SupportsIndex, errno: SupportsIndex) -> None:
    """Test-only: make the nth next `op` syscall fail with `errno` ('short_write' caps writes at nth bytes)."""

def clear_failpoints() -> None:
    """Remove every failpoint and the short-write cap."""

@final
class AtomicFile:
    """Crash-safe file writer: temporary file in `directory`, synced and renamed over `final_name` by commit()."""

    def __new__(
        cls,
        directory: StrOrBytesPath,
        final_name: str,
        *,
        sync: bool = ...,
        direct: bool = ...,
    ) -> Self:
        """Create and open '.{final_name}.{16 hex}.tmp' in `directory` (O_DIRECT if `direct` and supported)."""

    def write(
        self, buffers: Iterable[ReadableBuffer], *, checksum: bool = ...
    ) -> list[int]:
        """Write each C-contiguous buffer in order; return their CRC-32Cs ([] if not checksum); on error remove the temp file."""

    def commit(self) -> None:
        """fdatasync (if sync), close, rename over the final name, fsync the directory (if sync)."""

    def abort(self) -> None:
        """Close and remove the temporary file; a no-op once committed or aborted."""

    def __enter__(self) -> Self:
        """Return self."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> Literal[False]:
        """abort() (a no-op after commit()); never suppresses the exception."""

    @property
    def temp_path(self) -> str:
        """Path of the temporary file being written."""

    @property
    def final_path(self) -> str:
        """Path the file is renamed to by commit()."""

    @property
    def bytes_written(self) -> int:
        """Bytes given to write() so far (in direct mode up to 8 MiB may still be buffered in memory)."""

    @property
    def direct(self) -> bool:
        """True if the temporary file was opened with O_DIRECT (asked for and accepted by the filesystem)."""

    @property
    def closed(self) -> bool:
        """True once committed, aborted or failed."""

    @property
    def committed(self) -> bool:
        """True once the file has been renamed into place (even if the directory fsync then failed)."""
