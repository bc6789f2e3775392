"""Benchmark harness of fastbackup: `python3 -m benchmarks [--quick]`.

Measures, in one run with interleaved and repeated configurations, what a
save costs the training thread, the training loop, the disk and memory, and
what a restore costs, for fastbackup, Keras's own `BackupAndRestore` and the
machine's physical floors (see `docs/benchmarks.md`). The micro-benchmarks
in `benchmarks/test_micro.py` run with
`python -m pytest benchmarks/test_micro.py --benchmark-only`.

Importing this package makes sure the `fastbackup` that the benchmarks
import is a built one: run from a source checkout after a regular (not
editable) `pip install .`, the checkout's own `fastbackup/` directory comes
first on `sys.path` but holds no compiled extension, while the installed
copy does. Benchmarking the pure-Python fallback by accident would measure a
checksum a hundred times slower than the real one.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _has_native(package_dir: str) -> bool:
    try:
        names = os.listdir(package_dir)
    except OSError:
        return False
    return any(n.startswith("_native") and n.endswith((".so", ".pyd")) for n in names)


def _is_built_package(spec: importlib.machinery.ModuleSpec | None) -> bool:
    """True for a regular `fastbackup` package holding its extension."""
    if spec is None or not spec.submodule_search_locations:
        return False
    package_dir = list(spec.submodule_search_locations)[0]
    return os.path.isfile(os.path.join(package_dir, "__init__.py")) and _has_native(
        package_dir
    )


def _prefer_built_fastbackup() -> None:
    """Drops a source checkout from `sys.path` when it shadows a built install.

    Does nothing when `fastbackup` is already imported, when the pure-Python
    fallback is asked for (`FASTBACKUP_PURE_PYTHON`), when the first
    `fastbackup` found has its extension (in-place or editable build), or
    when no other copy exists (the import error then names the problem).
    """
    if "fastbackup" in sys.modules or os.environ.get("FASTBACKUP_PURE_PYTHON"):
        return
    spec = importlib.util.find_spec("fastbackup")
    if spec is None or not spec.submodule_search_locations:
        return
    package_dir = list(spec.submodule_search_locations)[0]
    if _has_native(package_dir) or not os.path.isfile(
        os.path.join(package_dir, "__init__.py")
    ):
        return
    checkout = os.path.realpath(os.path.dirname(package_dir))
    kept = [
        p for p in sys.path if os.path.realpath(p or os.getcwd()) != checkout
    ]
    saved, sys.path[:] = list(sys.path), kept
    importlib.invalidate_caches()
    if not _is_built_package(importlib.util.find_spec("fastbackup")):
        sys.path[:] = saved


_prefer_built_fastbackup()
