"""Selects the native extension or its pure-Python fallback.

`FASTBACKUP_PURE_PYTHON=1` selects `fastbackup._pynative`, which is slow
(its CRC-32C runs in Python) but needs no compiler. Without it, a missing
extension is an import error: silently falling back would hide a broken
build behind a hundredfold slower checksum.
"""

from __future__ import annotations

import os

if os.environ.get("FASTBACKUP_PURE_PYTHON", "").strip().lower() in (
    "1", "true", "yes", "on",
):
    from fastbackup import _pynative as native
else:
    from fastbackup import _native as native  # type: ignore[attr-defined, no-redef]

__all__ = ["native"]
