"""Tests of the I/O primitives: the C extension and its pure-Python twin.

Every test runs against both ``fastbackup._native`` and
``fastbackup._pynative``; they promise the same API and behaviour.

Writes over 2 GiB: Linux caps a single write(2) at 0x7ffff000 bytes, so such a
buffer always takes a short write. Instead of writing gigabytes in the suite,
the ``short_write`` failpoint forces short writes of a few bytes and the
content is checked byte for byte (test_short_writes_*). The real thing is
``test_write_over_2gib``, which runs only with FASTBACKUP_SLOW_TESTS=1.
"""

from __future__ import annotations

import errno
import gc
import importlib
import mmap
import os
import pathlib
import re
import threading

import numpy as np
import pytest

SLOW = os.environ.get("FASTBACKUP_SLOW_TESTS", "") == "1"
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{16}\.tmp$")


def _load(name: str):
    try:
        return importlib.import_module(f"fastbackup.{name}")
    except ImportError:
        if name == "_native" and os.environ.get("FASTBACKUP_PURE_PYTHON"):
            pytest.skip("C extension not built (FASTBACKUP_PURE_PYTHON set)")
        raise


@pytest.fixture(params=["_native", "_pynative"])
def impl(request):
    mod = _load(request.param)
    mod.clear_failpoints()
    yield mod
    mod.clear_failpoints()


@pytest.fixture
def native():
    mod = _load("_native")
    mod.clear_failpoints()
    yield mod
    mod.clear_failpoints()


def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """Independent reference: one bit at a time, no tables."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def files_in(path: pathlib.Path) -> list[str]:
    return sorted(os.listdir(path))


def write_file(impl, directory, name, chunks, **kwargs):
    with impl.AtomicFile(directory, name, **kwargs) as f:
        crcs = f.write(chunks)
        f.commit()
    return crcs


# --- crc32c -----------------------------------------------------------------

# RFC 3720 (iSCSI) B.4 vectors plus the usual check value.
KNOWN_VECTORS = [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data,expected", KNOWN_VECTORS)
def test_crc32c_known_vectors(impl, data, expected):
    assert impl.crc32c(data) == expected
    assert crc32c_bitwise(data) == expected


def test_crc32c_continuation(impl):
    data = os.urandom(5000)
    whole = impl.crc32c(data)
    for cut in (0, 1, 7, 8, 9, 100, 2500, 4999, 5000):
        assert impl.crc32c(data[cut:], impl.crc32c(data[:cut])) == whole
    assert impl.crc32c(b"", 0x12345678) == 0x12345678
    assert impl.crc32c(data, value=0) == whole


def test_crc32c_buffer_types(impl):
    arr = np.arange(3000, dtype=np.float32).reshape(30, 100)
    raw = arr.tobytes()
    expected = crc32c_bitwise(raw)
    assert impl.crc32c(arr) == expected
    assert impl.crc32c(memoryview(arr)) == expected
    assert impl.crc32c(bytearray(raw)) == expected
    assert impl.crc32c(memoryview(raw)[5:-3]) == crc32c_bitwise(raw[5:-3])
    assert impl.crc32c(np.float64(1.5)) == crc32c_bitwise(np.float64(1.5).tobytes())
    assert impl.crc32c(data=raw) == expected


def test_crc32c_rejects_bad_input(impl):
    # The exporter picks the error: numpy raises ValueError, memoryview BufferError.
    with pytest.raises((BufferError, ValueError)):
        impl.crc32c(np.arange(100, dtype=np.uint8)[::2])
    with pytest.raises(BufferError):
        impl.crc32c(memoryview(b"abcdef")[::2])
    with pytest.raises(TypeError):
        impl.crc32c("text")
    with pytest.raises(ValueError):
        impl.crc32c(b"x", -1)
    with pytest.raises(ValueError):
        impl.crc32c(b"x", 1 << 32)
    assert impl.crc32c(b"x", np.uint32(7)) == impl.crc32c(b"x", 7)


SIZES = [0, 1, 7, 8, 9, 63, 255, 256, 767, 768, 769, 1000, 8191, 24575,
         24576, 24577, 65536 + 3, 100_003]


def test_crc32c_implementations_agree():
    native, pynative = _load("_native"), _load("_pynative")
    rng = np.random.default_rng(42)
    data = rng.integers(0, 256, size=max(SIZES) + 16, dtype=np.uint8).tobytes()
    view = memoryview(data)
    for size in SIZES:
        for offset in (0, 1, 3, 5, 8):
            chunk = view[offset:offset + size]
            expected = pynative.crc32c(chunk)
            assert native.crc32c(chunk) == expected, (size, offset)
            assert native._crc32c_portable(chunk) == expected, (size, offset)
            if size <= 1000:
                assert crc32c_bitwise(bytes(chunk)) == expected


def test_crc32c_hardware_matches_portable_on_large_buffers(native):
    # The hardware path splits large inputs into three interleaved streams and
    # merges them; the portable path does not, so agreement checks the merge.
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, size=(5 << 20) + 11, dtype=np.uint8)
    for size in (3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1, 6 * 8192 + 3 * 256 + 5,
                 1 << 20, (5 << 20) + 3):
        for offset in (0, 1, 7):
            chunk = data[offset:offset + size]
            assert native.crc32c(chunk) == native._crc32c_portable(chunk)
    assert native._crc32c_impl in ("sse4.2", "slicing-by-8")


def test_crc32c_threads(native):
    # Large inputs release the GIL; results must not depend on concurrency.
    data = [os.urandom(1 << 20) for _ in range(4)]
    expected = [native._crc32c_portable(d) for d in data]
    results = [None] * 4

    def run(i):
        for _ in range(5):
            results[i] = native.crc32c(data[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


# --- crc32c_copy: the snapshot's copy, checksummed on the way -----------------

COPY_SIZES = SIZES + [3 * 8192 * 4 + 12_345, (1 << 20) + 5]


@pytest.mark.parametrize("size", COPY_SIZES)
def test_crc32c_copy_copies_and_checksums(impl, size):
    rng = np.random.default_rng(size)
    src = rng.integers(0, 256, size=size + 16, dtype=np.uint8)
    for src_offset, dst_offset in ((0, 0), (1, 0), (0, 3), (5, 7)):
        data = src[src_offset:src_offset + size]
        # Guard bytes either side: nothing outside dst is written.
        dst = np.full(size + 16, 0xA5, dtype=np.uint8)
        out = dst[dst_offset:dst_offset + size]
        value = int(rng.integers(0, 2**32))
        assert impl.crc32c_copy(out, data, value) == impl.crc32c(data, value)
        assert np.array_equal(out, data)
        assert (dst[:dst_offset] == 0xA5).all()
        assert (dst[dst_offset + size:] == 0xA5).all()


@pytest.mark.parametrize("size", COPY_SIZES)
def test_crc32c_copy_portable_path_agrees(native, size):
    rng = np.random.default_rng(size + 1)
    src = rng.integers(0, 256, size=size + 3, dtype=np.uint8)[3:]
    fast, portable = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    assert native.crc32c_copy(fast, src, 9) == native._crc32c_copy_portable(
        portable, src, 9) == native._crc32c_portable(src, 9)
    assert np.array_equal(fast, src) and np.array_equal(portable, src)


def test_crc32c_copy_any_dtype_and_buffer(impl):
    # The snapshot hands over uint8 views; other buffers work the same.
    src = np.arange(1000, dtype=np.float32)
    dst = np.empty_like(src)
    assert impl.crc32c_copy(dst, src) == impl.crc32c(src)
    assert np.array_equal(dst, src)
    target = bytearray(5)
    assert impl.crc32c_copy(target, b"abcde") == impl.crc32c(b"abcde")
    assert target == b"abcde"
    with mmap.mmap(-1, 4096) as m:
        assert impl.crc32c_copy(m, bytes(range(256)) * 16) == impl.crc32c(
            bytes(range(256)) * 16)
        assert m[:256] == bytes(range(256))


def test_crc32c_copy_rejects_bad_input(impl):
    with pytest.raises(ValueError, match=r"len\(dst\)=3, len\(src\)=4"):
        impl.crc32c_copy(bytearray(3), b"abcd")
    with pytest.raises(TypeError):
        impl.crc32c_copy(b"read-only", b"abcdefghi")
    with pytest.raises((BufferError, TypeError, ValueError)):
        impl.crc32c_copy(np.zeros(8)[::2], np.zeros(4))
    with pytest.raises(ValueError, match="range"):
        impl.crc32c_copy(bytearray(1), b"a", 2**32)


def test_crc32c_copy_refuses_overlap(native):
    # memmove semantics would cost the non-temporal stores; the snapshot
    # never overlaps, so the extension refuses instead of copying wrongly.
    buf = np.arange(100, dtype=np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        native.crc32c_copy(buf[10:60], buf[:50])


def test_crc32c_copy_threads(native):
    # Large copies release the GIL; each thread's result is its own.
    srcs = [np.frombuffer(os.urandom(1 << 20), np.uint8) for _ in range(4)]
    dsts = [np.zeros(1 << 20, np.uint8) for _ in range(4)]
    results = [None] * 4

    def run(i):
        for _ in range(5):
            results[i] = native.crc32c_copy(dsts[i], srcs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [native.crc32c(s) for s in srcs]
    assert all(np.array_equal(d, s) for d, s in zip(dsts, srcs))


# --- AtomicFile: normal operation --------------------------------------------

def test_write_commit(impl, tmp_path):
    chunks = [b"header", bytearray(b"\x00" * 100), memoryview(b"abcdefgh")[2:6],
              np.arange(64, dtype=np.float32).reshape(8, 8), b""]
    f = impl.AtomicFile(tmp_path, "model.fb")
    temp_name = os.path.basename(f.temp_path)
    assert TEMP_RE.match(temp_name).group("name") == "model.fb"
    assert os.path.dirname(f.temp_path) == str(tmp_path)
    assert f.final_path == os.path.join(str(tmp_path), "model.fb")
    assert files_in(tmp_path) == [temp_name]
    assert not f.closed and not f.committed

    crcs = f.write(chunks)
    expected_bytes = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)
    assert crcs == [impl.crc32c(c) for c in chunks]
    assert f.bytes_written == len(expected_bytes)
    assert f.write([b"tail"]) == [impl.crc32c(b"tail")]
    assert f.write([]) == []
    f.commit()
    assert f.closed and f.committed
    assert files_in(tmp_path) == ["model.fb"]
    assert (tmp_path / "model.fb").read_bytes() == expected_bytes + b"tail"


def test_checksum_false(impl, tmp_path):
    with impl.AtomicFile(tmp_path, "a") as f:
        assert f.write([b"abc", b"def"], checksum=False) == []
        f.commit()
    assert (tmp_path / "a").read_bytes() == b"abcdef"


def test_crc_across_chunks(native, tmp_path):
    # Buffers over the 4 MiB checksum chunk must still get one whole-buffer CRC.
    big = np.random.default_rng(1).integers(0, 256, size=(9 << 20) + 3,
                                             dtype=np.uint8)
    with native.AtomicFile(tmp_path, "big") as f:
        assert f.write([big, b"x"]) == [native.crc32c(big), native.crc32c(b"x")]
        f.commit()
    assert (tmp_path / "big").read_bytes() == big.tobytes() + b"x"


def test_path_types_and_sync_false(impl, tmp_path):
    write_file(impl, pathlib.Path(tmp_path), "p", [b"1"])
    write_file(impl, os.fsencode(str(tmp_path)), "b", [b"2"], sync=False)
    write_file(impl, str(tmp_path) + "/", "s", [b"3"])
    assert files_in(tmp_path) == ["b", "p", "s"]


def test_empty_directory_means_cwd(impl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = impl.AtomicFile("", "here")
    assert f.final_path == "here"
    assert TEMP_RE.match(f.temp_path)
    f.write([b"x"])
    f.commit()
    assert (tmp_path / "here").read_bytes() == b"x"


def test_mode_0644(impl, tmp_path):
    old = os.umask(0o022)
    try:
        write_file(impl, tmp_path, "m", [b"x"])
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o644


def test_replaces_existing_file_atomically(impl, tmp_path):
    target = tmp_path / "ckpt"
    target.write_bytes(b"old contents")
    old_inode = target.stat().st_ino
    f = impl.AtomicFile(tmp_path, "ckpt")
    f.write([b"new contents, longer"])
    # Until the rename the old file is untouched, not truncated in place.
    assert target.read_bytes() == b"old contents"
    f.commit()
    assert target.read_bytes() == b"new contents, longer"
    assert target.stat().st_ino != old_inode
    assert files_in(tmp_path) == ["ckpt"]


def test_abort(impl, tmp_path):
    f = impl.AtomicFile(tmp_path, "x")
    f.write([b"data"])
    f.abort()
    assert files_in(tmp_path) == []
    assert f.closed and not f.committed
    f.abort()  # idempotent
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.write([b"more"])
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.commit()


def test_abort_after_commit_keeps_file(impl, tmp_path):
    f = impl.AtomicFile(tmp_path, "x")
    f.write([b"data"])
    f.commit()
    f.abort()
    f.__exit__(None, None, None)
    assert (tmp_path / "x").read_bytes() == b"data"
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.commit()
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.write([b"x"])


def test_exception_inside_with_removes_temp(impl, tmp_path):
    (tmp_path / "x").write_bytes(b"previous")
    with pytest.raises(KeyError):
        with impl.AtomicFile(tmp_path, "x") as f:
            f.write([b"partial"])
            raise KeyError("boom")
    assert files_in(tmp_path) == ["x"]
    assert (tmp_path / "x").read_bytes() == b"previous"


def test_with_without_commit_aborts(impl, tmp_path):
    with impl.AtomicFile(tmp_path, "x") as f:
        f.write([b"partial"])
    assert f.closed
    assert files_in(tmp_path) == []


def test_dealloc_removes_temp(impl, tmp_path):
    f = impl.AtomicFile(tmp_path, "x")
    f.write([b"partial"])
    assert len(files_in(tmp_path)) == 1
    del f
    gc.collect()
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "dir/", "a\0b"])
def test_final_name_validation(impl, tmp_path, name):
    with pytest.raises(ValueError):
        impl.AtomicFile(tmp_path, name)
    assert files_in(tmp_path) == []


def test_final_name_must_be_str(impl, tmp_path):
    with pytest.raises(TypeError):
        impl.AtomicFile(tmp_path, b"name")
    assert files_in(tmp_path) == []


def test_open_failure_names_temp_path(impl, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as info:
        impl.AtomicFile(missing, "x")
    assert os.path.dirname(info.value.filename) == str(missing)
    assert TEMP_RE.match(os.path.basename(info.value.filename))


def test_write_rejects_single_buffer_and_bad_items(impl, tmp_path):
    with impl.AtomicFile(tmp_path, "x") as f:
        with pytest.raises(TypeError, match="sequence of buffers"):
            f.write(b"bytes")
        with pytest.raises(TypeError):
            f.write([b"ok", "not a buffer"])
        with pytest.raises((BufferError, ValueError)):
            f.write([b"ok", np.arange(10, dtype=np.uint8)[::2]])
        with pytest.raises(BufferError):
            f.write([b"ok", memoryview(b"abcdef")[::2]])
        # Nothing was written by the rejected calls and the file stays usable.
        assert f.bytes_written == 0
        f.write([b"fine"])
        f.commit()
    assert (tmp_path / "x").read_bytes() == b"fine"


def test_generator_of_buffers(impl, tmp_path):
    write_file(impl, tmp_path, "g", (bytes([i]) * 3 for i in range(4)))
    assert (tmp_path / "g").read_bytes() == b"\0\0\0\1\1\1\2\2\2\3\3\3"


def test_concurrent_writers(impl, tmp_path):
    errors = []

    def run(i):
        try:
            for j in range(5):
                write_file(impl, tmp_path, f"f{i}", [os.urandom(70_000), bytes([j])])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert files_in(tmp_path) == ["f0", "f1", "f2", "f3"]


# --- failpoints ----------------------------------------------------------------

def test_set_failpoint_validation(impl):
    with pytest.raises(ValueError):
        impl.set_failpoint("unlink", 1, errno.EIO)
    with pytest.raises(ValueError):
        impl.set_failpoint("write", 0, errno.EIO)
    with pytest.raises(ValueError):
        impl.set_failpoint("write", 1, 0)
    with pytest.raises(ValueError):
        impl.set_failpoint("short_write", 0, 0)
    impl.set_failpoint("short_write", 3, 0)
    for op in ("open", "write", "fsync", "close", "rename", "dirfsync"):
        impl.set_failpoint(op, 1, errno.EIO)
    impl.clear_failpoints()


def test_write_enospc(impl, tmp_path):
    (tmp_path / "ckpt").write_bytes(b"previous checkpoint")
    f = impl.AtomicFile(tmp_path, "ckpt")
    impl.set_failpoint("write", 1, errno.ENOSPC)
    with pytest.raises(OSError) as info:
        f.write([b"new data"])
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == f.temp_path
    assert files_in(tmp_path) == ["ckpt"]
    assert (tmp_path / "ckpt").read_bytes() == b"previous checkpoint"
    assert f.closed and not f.committed
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.write([b"again"])
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.commit()
    f.abort()


def test_write_fails_midway(impl, tmp_path):
    # 4-byte writes, the third fails: 8 bytes were on disk when it failed.
    impl.set_failpoint("short_write", 4, 0)
    impl.set_failpoint("write", 3, errno.EIO)
    with pytest.raises(OSError) as info:
        with impl.AtomicFile(tmp_path, "x") as f:
            f.write([b"0123456789abcdef"])
    assert info.value.errno == errno.EIO
    assert f.bytes_written == 8
    assert files_in(tmp_path) == []


def test_failpoint_is_one_shot(impl, tmp_path):
    impl.set_failpoint("write", 2, errno.EIO)
    with impl.AtomicFile(tmp_path, "x") as f:
        f.write([b"first"])
        with pytest.raises(OSError):
            f.write([b"second"])
    write_file(impl, tmp_path, "x", [b"third"])
    assert (tmp_path / "x").read_bytes() == b"third"


def test_write_eintr_is_retried(impl, tmp_path):
    impl.set_failpoint("write", 1, errno.EINTR)
    write_file(impl, tmp_path, "x", [b"survives EINTR"])
    assert (tmp_path / "x").read_bytes() == b"survives EINTR"


@pytest.mark.parametrize("cap", [1, 7, 4096])
def test_short_writes_keep_exact_content(impl, tmp_path, cap):
    rng = np.random.default_rng(cap)
    chunks = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in (1, 6, 7, 8, 5000, 0, 3)]
    impl.set_failpoint("short_write", cap, 0)
    crcs = write_file(impl, tmp_path, "x", chunks)
    expected = b"".join(c.tobytes() for c in chunks)
    assert (tmp_path / "x").read_bytes() == expected
    assert crcs == [crc32c_bitwise(c.tobytes()) if c.size < 100 else impl.crc32c(c)
                    for c in chunks]


def test_fsync_eio(impl, tmp_path):
    (tmp_path / "ckpt").write_bytes(b"previous")
    f = impl.AtomicFile(tmp_path, "ckpt")
    f.write([b"new"])
    impl.set_failpoint("fsync", 1, errno.EIO)
    with pytest.raises(OSError) as info:
        f.commit()
    assert info.value.errno == errno.EIO
    assert info.value.filename == f.temp_path
    assert files_in(tmp_path) == ["ckpt"]
    assert (tmp_path / "ckpt").read_bytes() == b"previous"
    # Never retried (fsyncgate): the object is finished.
    assert f.closed and not f.committed
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.commit()
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.write([b"x"])
    f.abort()


def test_sync_false_skips_fsyncs(impl, tmp_path):
    impl.set_failpoint("fsync", 1, errno.EIO)
    impl.set_failpoint("dirfsync", 1, errno.EIO)
    write_file(impl, tmp_path, "x", [b"data"], sync=False)
    assert (tmp_path / "x").read_bytes() == b"data"


def test_close_failure(impl, tmp_path):
    f = impl.AtomicFile(tmp_path, "x")
    f.write([b"data"])
    impl.set_failpoint("close", 1, errno.EIO)
    with pytest.raises(OSError) as info:
        f.commit()
    assert info.value.errno == errno.EIO
    assert info.value.filename == f.temp_path
    assert files_in(tmp_path) == []
    assert f.closed


def test_rename_failure_injected(impl, tmp_path):
    (tmp_path / "ckpt").write_bytes(b"previous")
    f = impl.AtomicFile(tmp_path, "ckpt")
    f.write([b"new"])
    impl.set_failpoint("rename", 1, errno.EXDEV)
    with pytest.raises(OSError) as info:
        f.commit()
    assert info.value.errno == errno.EXDEV
    assert info.value.filename == f.temp_path
    assert info.value.filename2 == f.final_path
    assert files_in(tmp_path) == ["ckpt"]
    assert (tmp_path / "ckpt").read_bytes() == b"previous"
    assert f.closed and not f.committed


def test_rename_failure_real(impl, tmp_path):
    # A non-empty directory in the way makes rename(2) itself fail.
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep").write_bytes(b"k")
    f = impl.AtomicFile(tmp_path, "ckpt")
    f.write([b"new"])
    with pytest.raises(OSError) as info:
        f.commit()
    assert info.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert info.value.filename == f.temp_path
    assert files_in(tmp_path) == ["ckpt"]


def test_dirfsync_failure_after_rename(impl, tmp_path):
    (tmp_path / "ckpt").write_bytes(b"previous")
    f = impl.AtomicFile(tmp_path, "ckpt")
    f.write([b"new"])
    impl.set_failpoint("dirfsync", 1, errno.EIO)
    with pytest.raises(OSError) as info:
        f.commit()
    assert info.value.errno == errno.EIO
    assert info.value.filename == str(tmp_path)
    # In place, but not known durable.
    assert files_in(tmp_path) == ["ckpt"]
    assert (tmp_path / "ckpt").read_bytes() == b"new"
    assert f.closed and f.committed
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.commit()
    f.abort()
    assert (tmp_path / "ckpt").read_bytes() == b"new"


def test_open_failure_injected(impl, tmp_path):
    impl.set_failpoint("open", 1, errno.EACCES)
    with pytest.raises(PermissionError) as info:
        impl.AtomicFile(tmp_path, "x")
    assert TEMP_RE.match(os.path.basename(info.value.filename))
    assert files_in(tmp_path) == []


def test_open_retries_on_name_collision(impl, tmp_path):
    impl.set_failpoint("open", 1, errno.EEXIST)
    write_file(impl, tmp_path, "x", [b"ok"])
    assert files_in(tmp_path) == ["x"]


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="writes 2.2 GiB; set FASTBACKUP_SLOW_TESTS=1")
@pytest.mark.parametrize("checksum", [True, False])
def test_write_over_2gib(impl, tmp_path, checksum):
    if checksum and impl.__name__.endswith("_pynative"):
        pytest.skip("the pure-Python CRC would take hours on 2.2 GiB")
    size = (2 << 30) + (200 << 20)
    data = np.zeros(size, dtype=np.uint8)
    data[::4093] = 0x5A
    with impl.AtomicFile(tmp_path, "huge") as f:
        crcs = f.write([data], checksum=checksum)
        f.commit()
    assert f.bytes_written == size
    assert (tmp_path / "huge").stat().st_size == size
    native = _load("_native")
    crc_back = 0
    with open(tmp_path / "huge", "rb") as fh:
        while block := fh.read(64 << 20):
            crc_back = native.crc32c(block, crc_back)
    assert crc_back == native.crc32c(data)
    if checksum:
        assert crcs == [crc_back]


# --- AtomicFile: direct mode (O_DIRECT through a bounce buffer) ----------------

MiB = 1 << 20
BOUNCE = 8 * MiB  # native/atomic_file.c BOUNCE_SIZE
NO_ODIRECT_FS = ("ramfs",)  # refuse O_DIRECT; tmpfs accepts it since Linux 6.6


def fs_type(path) -> str:
    """Filesystem type of the mount holding `path`, from /proc/mounts."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/mounts") as fh:
        for line in fh:
            mnt, typ = line.split()[1:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) \
                    and len(mnt) > len(best):
                best, kind = mnt, typ
    return kind


def odirect_flag(path: str) -> bool:
    """Whether this process has `path` open with O_DIRECT (from fdinfo)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != path:
                continue
            with open(f"/proc/self/fdinfo/{fd}") as fh:
                for line in fh:
                    if line.startswith("flags:"):
                        return bool(int(line.split()[1], 8) & os.O_DIRECT)
        except OSError:
            continue
    raise AssertionError(f"{path} is not open")


@pytest.fixture
def disk_dir(tmp_path):
    """A directory on a filesystem that takes O_DIRECT (not tmpfs/ramfs)."""
    if fs_type(tmp_path) not in ("tmpfs", "ramfs"):
        yield tmp_path
        return
    import shutil
    import tempfile
    path = pathlib.Path(tempfile.mkdtemp(
        prefix=".direct-test-", dir=pathlib.Path(__file__).resolve().parents[1]))
    if fs_type(path) in ("tmpfs", "ramfs"):
        shutil.rmtree(path)
        pytest.skip("no disk-backed directory for O_DIRECT")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ramfs_dir(tmp_path):
    """A filesystem that refuses O_DIRECT, to test the buffered fallback."""
    import subprocess
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount ramfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def rand_chunks(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]


DIRECT_CASES = {
    "empty": [[]],
    "zero": [[0]],
    "one": [[1]],
    "4095": [[4095]],
    "4096": [[4096]],
    "4097": [[4097]],
    "8MiB-1": [[BOUNCE - 1]],
    "8MiB": [[BOUNCE]],
    "8MiB+1": [[BOUNCE + 1]],
    "odd-buffers": [[1, 4095, 3, BOUNCE + 5, 12345, 0, 3 * 4096 + 1, 7]],
    # Several write() calls: partial blocks carry over between them.
    "calls-small": [[1], [4094], [1, 2], [4096], [0], [5000, 3]],
    "calls-fill": [[BOUNCE - 3], [2], [1], [1, BOUNCE], [4095]],
    "calls-big": [[3 * BOUNCE + 17, 5], [BOUNCE - 22], [4096 * 5 + 9]],
}


@pytest.mark.parametrize("calls", list(DIRECT_CASES.values()),
                         ids=list(DIRECT_CASES))
def test_direct_same_as_buffered(native, disk_dir, calls):
    data = [rand_chunks(sizes, seed=i) for i, sizes in enumerate(calls)]
    results = {}
    for direct in (False, True):
        name = f"d{int(direct)}"
        f = native.AtomicFile(disk_dir, name, direct=direct)
        assert f.direct is direct
        crcs = [f.write(chunks) for chunks in data]
        assert f.bytes_written == sum(c.size for chunks in data for c in chunks)
        f.commit()
        results[direct] = (crcs, (disk_dir / name).read_bytes())
    expected = b"".join(c.tobytes() for chunks in data for c in chunks)
    assert results[True][1] == expected
    assert results[True] == results[False]
    assert results[True][0] == [[native.crc32c(c) for c in chunks]
                                for chunks in data]
    assert files_in(disk_dir) == ["d0", "d1"]


def test_direct_checksum_false(native, disk_dir):
    chunks = rand_chunks([BOUNCE + 3, 10])
    with native.AtomicFile(disk_dir, "x", direct=True) as f:
        assert f.write(chunks, checksum=False) == []
        f.commit()
    assert (disk_dir / "x").read_bytes() == b"".join(c.tobytes() for c in chunks)


def test_direct_uses_odirect_then_clears_it_for_tail(native, disk_dir):
    f = native.AtomicFile(disk_dir, "x", direct=True)
    assert f.direct and odirect_flag(f.temp_path)
    # One byte off alignment, so that the bytes go through the bounce buffer
    # (numpy may hand out page-aligned memory, which would not).
    f.write([mapped(BOUNCE + 4097, shift=1)])
    # The full bounce buffer went out with O_DIRECT; 4097 bytes wait in memory.
    assert os.path.getsize(f.temp_path) == BOUNCE
    assert f.bytes_written == BOUNCE + 4097
    assert odirect_flag(f.temp_path)
    f.commit()
    assert f.direct  # what the file was opened with, not the tail's state
    assert os.path.getsize(disk_dir / "x") == BOUNCE + 4097


def test_direct_flag_on_both_impls(impl, disk_dir):
    # The pure-Python twin accepts direct=True and writes buffered.
    with impl.AtomicFile(disk_dir, "x", direct=True) as f:
        expected = impl.__name__.endswith("_native") \
            and fs_type(disk_dir) not in NO_ODIRECT_FS
        assert f.direct is expected
        assert f.write([b"abc", b"de"]) == [impl.crc32c(b"abc"), impl.crc32c(b"de")]
        f.commit()
    assert (disk_dir / "x").read_bytes() == b"abcde"
    with impl.AtomicFile(disk_dir, "y") as f:
        assert f.direct is False
        f.commit()


def test_direct_on_tmpfs(native):
    # tmpfs refused O_DIRECT before Linux 6.6 and takes it since; either way
    # the content must be right and `direct` must say what is in use.
    if not os.path.isdir("/dev/shm") or fs_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    import shutil
    import tempfile
    d = pathlib.Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        chunks = rand_chunks([BOUNCE + 4097, 1, 4095])
        with native.AtomicFile(d, "x", direct=True) as f:
            assert f.direct is odirect_flag(f.temp_path)
            crcs = f.write(chunks)
            f.commit()
        assert crcs == [native.crc32c(c) for c in chunks]
        assert (d / "x").read_bytes() == b"".join(c.tobytes() for c in chunks)
        assert files_in(d) == ["x"]
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_direct_falls_back_where_refused(impl, ramfs_dir):
    chunks = rand_chunks([BOUNCE + 4097, 1] if impl.__name__.endswith("_native")
                         else [5000, 1])
    with impl.AtomicFile(ramfs_dir, "x", direct=True) as f:
        assert f.direct is False
        assert not odirect_flag(f.temp_path)
        # No stray file from a refused O_DIRECT open.
        assert files_in(ramfs_dir) == [os.path.basename(f.temp_path)]
        crcs = f.write(chunks)
        f.commit()
    assert crcs == [impl.crc32c(c) for c in chunks]
    assert (ramfs_dir / "x").read_bytes() == b"".join(c.tobytes() for c in chunks)
    assert files_in(ramfs_dir) == ["x"]


def test_direct_abort_and_dealloc_with_pending_bytes(native, disk_dir):
    f = native.AtomicFile(disk_dir, "x", direct=True)
    f.write(rand_chunks([BOUNCE + 10]))
    f.abort()
    assert f.closed and files_in(disk_dir) == []
    f = native.AtomicFile(disk_dir, "y", direct=True)
    f.write([b"pending"])
    del f
    gc.collect()
    assert files_in(disk_dir) == []


# Failpoints in direct mode. The write(2) calls happen when the bounce buffer
# fills and at commit(), so a write error surfaces in either.

@pytest.mark.parametrize("size,fails_in", [(100, "commit"), (BOUNCE, "write"),
                                           (BOUNCE + 100, "write")])
def test_direct_write_enospc(native, disk_dir, size, fails_in):
    (disk_dir / "ckpt").write_bytes(b"previous checkpoint")
    f = native.AtomicFile(disk_dir, "ckpt", direct=True)
    native.set_failpoint("write", 1, errno.ENOSPC)
    with pytest.raises(OSError) as info:
        f.write(rand_chunks([size]))
        assert fails_in == "commit"
        f.commit()
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == f.temp_path
    assert files_in(disk_dir) == ["ckpt"]
    assert (disk_dir / "ckpt").read_bytes() == b"previous checkpoint"
    assert f.closed and not f.committed
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.write([b"again"])
    f.abort()


def test_direct_tail_write_fails_after_aligned_part(native, disk_dir):
    # commit() writes 8192 bytes with O_DIRECT, then the 5-byte tail fails.
    (disk_dir / "ckpt").write_bytes(b"previous")
    f = native.AtomicFile(disk_dir, "ckpt", direct=True)
    f.write(rand_chunks([8192 + 5]))
    native.set_failpoint("write", 2, errno.EIO)
    with pytest.raises(OSError) as info:
        f.commit()
    assert info.value.errno == errno.EIO
    assert files_in(disk_dir) == ["ckpt"]
    assert (disk_dir / "ckpt").read_bytes() == b"previous"


def test_direct_fsync_eio(native, disk_dir):
    (disk_dir / "ckpt").write_bytes(b"previous")
    f = native.AtomicFile(disk_dir, "ckpt", direct=True)
    f.write(rand_chunks([BOUNCE + 4097]))
    native.set_failpoint("fsync", 1, errno.EIO)
    with pytest.raises(OSError) as info:
        f.commit()
    assert info.value.errno == errno.EIO
    assert info.value.filename == f.temp_path
    assert files_in(disk_dir) == ["ckpt"]
    assert (disk_dir / "ckpt").read_bytes() == b"previous"
    assert f.closed and not f.committed
    with pytest.raises(ValueError, match="AtomicFile is closed"):
        f.commit()


def test_direct_write_eintr_is_retried(native, disk_dir):
    native.set_failpoint("write", 1, errno.EINTR)
    chunks = rand_chunks([BOUNCE + 3])
    write_file(native, disk_dir, "x", chunks, direct=True)
    assert (disk_dir / "x").read_bytes() == chunks[0].tobytes()


@pytest.mark.parametrize("cap", [1, 7, 4095, 4096, 5000, 3 * 4096 + 1,
                                 BOUNCE - 1])
def test_direct_short_writes_keep_exact_content(native, disk_dir, cap):
    sizes = (1, 6, 5000, BOUNCE - 4000, 0, 3, BOUNCE + 4099) if cap > 100 \
        else (1, 6, 5000, 3, 40_000)  # 1-byte writes of 16 MiB take too long
    chunks = rand_chunks(sizes, seed=cap)
    (disk_dir / "x").write_bytes(b"previous")
    native.set_failpoint("short_write", cap, 0)
    with native.AtomicFile(disk_dir, "x", direct=True) as f:
        crcs = f.write(chunks[:3])
        crcs += f.write(chunks[3:])
        # A cap under one block forces the rest of the file to go buffered.
        assert odirect_flag(f.temp_path) is (cap >= 4096 or sum(sizes) < BOUNCE)
        f.commit()
    assert (disk_dir / "x").read_bytes() == b"".join(c.tobytes() for c in chunks)
    assert crcs == [native.crc32c(c) for c in chunks]
    assert files_in(disk_dir) == ["x"]


def test_direct_short_write_then_failure(native, disk_dir):
    # 4096-byte writes; the 3rd of the first bounce flush fails.
    (disk_dir / "ckpt").write_bytes(b"previous")
    native.set_failpoint("short_write", 4096, 0)
    native.set_failpoint("write", 3, errno.EIO)
    with pytest.raises(OSError) as info:
        with native.AtomicFile(disk_dir, "ckpt", direct=True) as f:
            f.write(rand_chunks([BOUNCE + 1]))
    assert info.value.errno == errno.EIO
    assert files_in(disk_dir) == ["ckpt"]
    assert (disk_dir / "ckpt").read_bytes() == b"previous"


# Direct mode, zero copy: an aligned buffer goes to O_DIRECT from where it is --

ZERO_COPY_MIN = 256 << 10  # native/atomic_file.c ZERO_COPY_MIN


def mapped(nbytes: int, seed: int = 0, shift: int = 0) -> np.ndarray:
    """Random bytes in an anonymous mapping, starting `shift` bytes into it.

    A mapping starts on a page: `shift=0` gives a page-aligned buffer, any
    other shift an unaligned one.
    """
    mapping = mmap.mmap(-1, shift + nbytes + 4096)
    out = np.frombuffer(mapping, np.uint8, count=nbytes, offset=shift)
    out[:] = np.random.default_rng(seed).integers(0, 256, nbytes, np.uint8)
    return out


def on_disk(f) -> int:
    return os.path.getsize(f.temp_path)


def test_direct_aligned_buffer_skips_the_bounce_buffer(native, disk_dir):
    # An aligned buffer is on disk as soon as write() returns; the same
    # bytes one byte off alignment wait in the bounce buffer (under 8 MiB).
    size = 1 << 20
    f = native.AtomicFile(disk_dir, "aligned", direct=True)
    data = mapped(size)
    assert data.ctypes.data % 4096 == 0
    assert f.write([data]) == [native.crc32c(data)]
    assert on_disk(f) == size and odirect_flag(f.temp_path)
    f.commit()
    g = native.AtomicFile(disk_dir, "shifted", direct=True)
    shifted = mapped(size, shift=1)
    assert g.write([shifted]) == [native.crc32c(shifted)]
    assert on_disk(g) == 0
    g.commit()
    assert (disk_dir / "aligned").read_bytes() == data.tobytes()
    assert (disk_dir / "shifted").read_bytes() == shifted.tobytes()


# (buffer sizes, which are mapped page-aligned, bytes on disk after write())
ZERO_COPY_CASES = {
    # The aligned part goes straight out; the 5-byte tail waits in bounce.
    "tail": ([(1 << 20) + 5], 1 << 20),
    # Aligned but small: copied; the large one after it goes straight out,
    # preceded by the bounce buffer's pending block.
    "small-then-large": ([4096, 1 << 20], (1 << 20) + 4096),
    # One pending byte makes the file offset unaligned: no zero copy.
    "unaligned-offset": ([1, 1 << 20], 0),
    "below-threshold": ([ZERO_COPY_MIN - 4096], 0),
    "at-threshold": ([ZERO_COPY_MIN], ZERO_COPY_MIN),
    # Larger than the bounce buffer and than one 4 MiB CRC chunk.
    "large": ([BOUNCE + 3 * 4096 + 7, 4096 * 3], BOUNCE + 3 * 4096),
}


@pytest.mark.parametrize("sizes,expected", list(ZERO_COPY_CASES.values()),
                         ids=list(ZERO_COPY_CASES))
def test_direct_zero_copy_same_as_buffered(native, disk_dir, sizes, expected):
    chunks = [mapped(n, seed=i) for i, n in enumerate(sizes)]
    results = {}
    for direct in (False, True):
        name = f"d{int(direct)}"
        f = native.AtomicFile(disk_dir, name, direct=direct)
        crcs = f.write(chunks)
        if direct:
            assert on_disk(f) == expected
            assert f.bytes_written == sum(sizes)
        f.commit()
        results[direct] = (crcs, (disk_dir / name).read_bytes())
    assert results[True] == results[False]
    assert results[True][1] == b"".join(c.tobytes() for c in chunks)
    assert results[True][0] == [native.crc32c(c) for c in chunks]


def test_direct_zero_copy_checksum_false(native, disk_dir):
    data = mapped(1 << 20)
    with native.AtomicFile(disk_dir, "x", direct=True) as f:
        assert f.write([data], checksum=False) == []
        assert on_disk(f) == 1 << 20
        f.commit()
    assert (disk_dir / "x").read_bytes() == data.tobytes()


@pytest.mark.parametrize("cap", [7, 4095, 4096, 5000, 3 * 4096 + 1, 1 << 20])
def test_direct_zero_copy_short_writes(native, disk_dir, cap):
    # Short writes from the caller's memory: a cap is rounded down to whole
    # blocks, and one under a block turns O_DIRECT off for the rest of the
    # file; the content stays exact.
    chunks = [mapped(ZERO_COPY_MIN + 4096 * 3 + 11, seed=cap), mapped(20),
              mapped(2 * ZERO_COPY_MIN, seed=2)]
    native.set_failpoint("short_write", cap, 0)
    with native.AtomicFile(disk_dir, "x", direct=True) as f:
        crcs = f.write(chunks)
        assert odirect_flag(f.temp_path) is (cap >= 4096)
        f.commit()
    assert crcs == [native.crc32c(c) for c in chunks]
    assert (disk_dir / "x").read_bytes() == b"".join(c.tobytes() for c in chunks)


@pytest.mark.parametrize("nth", [1, 2])
def test_direct_zero_copy_write_fails(native, disk_dir, nth):
    # 1: the first zero-copy write(2); 2: the second 4 MiB chunk of it.
    (disk_dir / "ckpt").write_bytes(b"previous")
    f = native.AtomicFile(disk_dir, "ckpt", direct=True)
    native.set_failpoint("write", nth, errno.ENOSPC)
    with pytest.raises(OSError) as info:
        f.write([mapped(6 << 20)])
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == f.temp_path
    assert f.closed and files_in(disk_dir) == ["ckpt"]
    assert (disk_dir / "ckpt").read_bytes() == b"previous"


def test_direct_zero_copy_falls_back_where_refused(native, ramfs_dir):
    chunks = [mapped(1 << 20), mapped(5, seed=1), mapped(ZERO_COPY_MIN, seed=2)]
    with native.AtomicFile(ramfs_dir, "x", direct=True) as f:
        assert f.direct is False
        crcs = f.write(chunks)
        f.commit()
    assert crcs == [native.crc32c(c) for c in chunks]
    assert (ramfs_dir / "x").read_bytes() == b"".join(c.tobytes() for c in chunks)
