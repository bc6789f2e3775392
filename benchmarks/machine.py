"""The machine the benchmarks run on, and where they write.

A benchmark figure means nothing without the machine: cores, memory, the
file system and device written to, and the versions of everything in the
path. Where the backup directory lives matters most: on tmpfs `fsync` is a
no-op, so the durable-write figures would measure memory, not a disk.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Any


@dataclasses.dataclass(frozen=True)
class Mount:
    """The mount a path lives on, from `/proc/self/mountinfo`."""

    mount_point: str
    fs_type: str
    source: str


def mount_of(path: str) -> Mount | None:
    """Returns the mount holding `path` (longest mount-point prefix)."""
    real = os.path.realpath(path)
    best: Mount | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        point = fields[4].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = Mount(point, tail[0], tail[1])
    return best


def is_memory_fs(path: str) -> bool:
    """True when `path` lives on tmpfs/ramfs, where fsync does nothing."""
    mount = mount_of(path)
    return mount is not None and mount.fs_type in ("tmpfs", "ramfs")


def make_work_dir(parent: str | None) -> str:
    """Creates the directory the benchmarks write their backups into.

    Args:
        parent: where to create it; `None` picks the current working
            directory's disk (never `/tmp` when that is tmpfs).

    Returns:
        A new, empty directory that the caller removes at the end.
    """
    if parent is None:
        parent = os.getcwd()
        if is_memory_fs(parent):
            tmp = tempfile.gettempdir()
            parent = tmp if not is_memory_fs(tmp) else parent
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".fastbackup-bench-", dir=parent)


def _block_device(source: str) -> dict[str, Any]:
    name = os.path.basename(source)
    info: dict[str, Any] = {"device": source}
    base = f"/sys/class/block/{name}"
    if not os.path.exists(base):
        return info
    for key, rel in (("rotational", "queue/rotational"), ("size_sectors", "size"),
                     ("scheduler", "queue/scheduler")):
        for candidate in (f"{base}/{rel}", f"{base}/../{rel}"):
            try:
                with open(candidate, encoding="utf-8") as f:
                    info[key] = f.read().strip()
                break
            except OSError:
                continue
    if "size_sectors" in info:
        info["size_gb"] = round(int(info.pop("size_sectors")) * 512 / 1e9, 1)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return "not installed"


def _git_commit(repo: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--", "fastbackup", "native"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def describe(work_dir: str) -> dict[str, Any]:
    """Everything about the machine a reader needs to weigh the figures."""
    import psutil

    import fastbackup
    from fastbackup._compat import native

    mount = mount_of(work_dir)
    usage = shutil.disk_usage(work_dir)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(fastbackup.__file__)))
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "work_dir": work_dir,
        "filesystem": dataclasses.asdict(mount) if mount else None,
        "disk": _block_device(mount.source) if mount else None,
        "disk_free_gb": round(usage.free / 1e9, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "fastbackup": fastbackup.__version__,
            "fastbackup_native": native.__name__,
            "crc32c_impl": getattr(native, "_crc32c_impl", "python"),
            "fastbackup_path": os.path.dirname(fastbackup.__file__),
            "git_commit": _git_commit(repo),
            "numpy": _version("numpy"),
            "tensorflow": _version("tensorflow"),
            "keras": _version("keras"),
            "keras_backend": _keras_backend(),
            "zstandard": _version("zstandard"),
            "h5py": _version("h5py"),
            "orbax-checkpoint": _version("orbax.checkpoint"),
        },
    }


def _keras_backend() -> str:
    import keras

    return str(keras.backend.backend())
