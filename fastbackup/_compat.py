"""Selects the native extension or its pure-Python fallback.

`FASTBACKUP_PURE_PYTHON=1` selects `fastbackup._pynative`, which is slow
(its CRC-32C runs in Python) but needs no compiler. Without it, a missing
extension is an import error: silently falling back would hide a broken
build behind a hundredfold slower checksum.
"""

from __future__ import annotations

import os

_raw = os.environ.get("FASTBACKUP_PURE_PYTHON", "")
_value = _raw.strip().lower()
if _value in ("1", "true", "yes", "on"):
    from fastbackup import _pynative as native
elif _value in ("", "0", "false", "no", "off"):
    from fastbackup import _native as native  # type: ignore[no-redef]
else:
    # ConfigError lives in errors.py, which needs nothing from here.
    from fastbackup.errors import ConfigError

    raise ConfigError(
        "Invalid value for environment variable `FASTBACKUP_PURE_PYTHON`. "
        f"Received: FASTBACKUP_PURE_PYTHON={_raw!r}. Expected one of: "
        "1, true, yes, on, 0, false, no, off."
    )

__all__ = ["native"]
