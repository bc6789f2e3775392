"""Configuration read from `FASTBACKUP_*` environment variables.

The variables are read once, when a callback is constructed, so a training
job's behaviour cannot change under it. Every value is validated; a bad one
raises `ConfigError` naming the variable, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

from fastbackup.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated settings of one callback.

    Attributes:
        compression_level: zstd level tried on tensors that compress well
            enough to pay for it; `None` turns compression off.
            `FASTBACKUP_COMPRESSION`: an integer in [-7, 22] or "off".
            Defaults to 1.
        on_busy: what a batch-level save does while the previous one is still
            being written. "coalesce" (default) never blocks the training
            step: the save is taken at the first step boundary where the
            writer is free (or replaces the pending snapshot); "wait" blocks
            the step until the writer is free. `FASTBACKUP_ON_BUSY`.
        pending_snapshots: host snapshots allowed to wait while another one
            is written: 0 (peak extra memory is one copy of the state), 1
            (two copies; a due save is snapshotted at once and replaces any
            older pending one) or `None` (default, "auto": 1 for states of
            at most `writer.AUTO_SECOND_BUFFER_BYTES`, 0 above).
            `FASTBACKUP_PENDING_SNAPSHOTS`: auto, 0, 1.
        fsync: make every checkpoint durable with fsync before and after the
            rename. Turning it off is only for benchmarks on tmpfs.
            `FASTBACKUP_FSYNC`: on/off. Defaults to on.
        direct_io: write checkpoints with O_DIRECT, bypassing the page
            cache, which saves the writer thread most of its CPU time (taken
            from training) and keeps the checkpoint from evicting the
            training data's cached pages. Falls back to buffered writes
            where the filesystem refuses it. `FASTBACKUP_DIRECT_IO`: on/off.
            Defaults to on.
        on_error: what a failed background write does at the next callback
            call: "raise" (default) raises `BackupWriteError` on the
            training thread; "warn" logs a warning and keeps training.
            `FASTBACKUP_ON_ERROR`.
        log_level: level of the `fastbackup` logger, or `None` to leave it
            alone. `FASTBACKUP_LOG_LEVEL`: debug, info, warning, error,
            critical.
        resume_mid_epoch: resume at the batch after the saved one instead
            of replaying the saved epoch. `FASTBACKUP_RESUME_MID_EPOCH`:
            on/off. Defaults to off (Keras's behaviour).
        handle_sigterm: on SIGTERM, save at the next step boundary and stop
            training. `FASTBACKUP_HANDLE_SIGTERM`: on/off. Defaults to off.
        overlap: at a batch-level save, copy the trainable and optimizer
            variables on a background thread while the next step's forward
            and backward passes run; that step's optimizer update waits for
            the copy (see `fastbackup.overlap`). TensorFlow and torch on the
            host only; elsewhere saves copy synchronously.
            `FASTBACKUP_OVERLAP`: on/off. Defaults to off (on a 2-core
            machine its gain was within the noise, see docs/benchmarks.md).
        lease_seconds: lifetime of the lock lease of an object-store backup
            (`s3://`, `gs://`): the holder renews it four times per
            lifetime; a killed job's backup can be taken over this long
            after its last renewal. `FASTBACKUP_LEASE_SECONDS`: seconds,
            from 0.5 to 86400. Defaults to 60.
        lease_wait_seconds: the longest a new job waits for the lease of a
            holder it cannot check to lapse (a holder on another host, or in
            another pid namespace): it then takes the lease over, unless the
            holder renews it meanwhile (a live job: `BackupDirLockedError`).
            A lease valid longer than this is refused at once. A dead
            holder on this same host is taken over without waiting.
            `FASTBACKUP_LEASE_WAIT_SECONDS`: seconds, from 0.5 to 86400.
            Defaults to 120 (two default lease lifetimes).
        retry_seconds: how long a request to an object store is retried
            (with exponential backoff, on 5xx, 503 SlowDown and dropped
            connections) before the write fails with `BackupWriteError`.
            `FASTBACKUP_RETRY_SECONDS`: seconds, from 0.5 to 86400.
            Defaults to 180.
        request_timeout_seconds: the longest one request to an object
            store may take, from connecting to the end of the answer
            (connecting alone is limited to 10 s), before it is abandoned
            and retried, within `retry_seconds`: a server that stops
            answering costs this long per try instead of stalling the write.
            `FASTBACKUP_REQUEST_TIMEOUT_SECONDS`: seconds, from 0.5 to
            86400. Defaults to 120 (a 16 MiB part at about 140 kB/s).
        peer_timeout_seconds: in a multi-process job, how long one process
            waits for the others (their parts of a checkpoint, the commit,
            the lock, the end of `fit`) before its write fails with
            `BackupWriteError`; a process that JAX's coordination service
            reports dead fails it at once. `FASTBACKUP_PEER_TIMEOUT_SECONDS`:
            seconds, from 0.5 to 86400. Defaults to 300.
    """

    compression_level: int | None = 1
    on_busy: str = "coalesce"
    pending_snapshots: int | None = None
    fsync: bool = True
    direct_io: bool = True
    on_error: str = "raise"
    log_level: str | None = None
    resume_mid_epoch: bool = False
    handle_sigterm: bool = False
    overlap: bool = False
    lease_seconds: float = 60.0
    lease_wait_seconds: float = 120.0
    retry_seconds: float = 180.0
    request_timeout_seconds: float = 120.0
    peer_timeout_seconds: float = 300.0


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(
        f"Invalid value for environment variable `{name}`. "
        f"Received: {name}={raw!r}. Expected one of: "
        f"{', '.join(_TRUE + _FALSE)}."
    )


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(
            f"Invalid value for environment variable `{name}`. "
            f"Received: {name}={raw!r}. Expected one of: {', '.join(choices)}."
        )
    return value


def _compression(name: str, raw: str) -> int | None:
    value = raw.strip().lower()
    if value in ("off", "none", "false", "no"):
        return None
    try:
        level = int(value)
    except ValueError:
        level = None
    if level == 0:
        # zstd reads level 0 as "default" (3); here it means off.
        return None
    if level is None or not -7 <= level <= 22:
        raise ConfigError(
            f"Invalid value for environment variable `{name}`. "
            f"Received: {name}={raw!r}. Expected an integer zstd level "
            "from -7 to 22 (0 disables), or 'off'."
        )
    return level


def _pending(value: str) -> int | None:
    return None if value == "auto" else int(value)


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = float("nan")
    if not 0.5 <= value <= 86400:
        raise ConfigError(
            f"Invalid value for environment variable `{name}`. "
            f"Received: {name}={raw!r}. Expected a number of seconds from "
            "0.5 to 86400."
        )
    return value


def seconds_from_environ(name: str) -> float:
    """`FASTBACKUP_LEASE_SECONDS`, `FASTBACKUP_LEASE_WAIT_SECONDS`,
    `FASTBACKUP_RETRY_SECONDS` or `FASTBACKUP_REQUEST_TIMEOUT_SECONDS`,
    validated.

    For stores opened outside a callback (the CLI); see `Config`.
    """
    field = {"FASTBACKUP_LEASE_SECONDS": "lease_seconds",
             "FASTBACKUP_LEASE_WAIT_SECONDS": "lease_wait_seconds",
             "FASTBACKUP_RETRY_SECONDS": "retry_seconds",
             "FASTBACKUP_REQUEST_TIMEOUT_SECONDS":
                 "request_timeout_seconds"}[name]
    raw = os.environ.get(name)
    if raw is None:
        return getattr(Config, field)
    return _seconds(name, raw)


def from_environ(environ: Mapping[str, str] | None = None) -> Config:
    """Reads and validates every `FASTBACKUP_*` variable.

    Args:
        environ: mapping to read instead of `os.environ` (for tests).

    Returns:
        The validated `Config`.

    Raises:
        ConfigError: a variable has a value outside the accepted ones, or an
            unknown `FASTBACKUP_*` variable is set (a typo would otherwise
            be silently ignored).
    """
    env = os.environ if environ is None else environ
    kwargs: dict[str, object] = {}
    parsers = {
        "FASTBACKUP_COMPRESSION": ("compression_level", _compression),
        "FASTBACKUP_ON_BUSY": (
            "on_busy",
            lambda n, r: _choice(n, r, ("coalesce", "wait")),
        ),
        "FASTBACKUP_PENDING_SNAPSHOTS": (
            "pending_snapshots",
            lambda n, r: _pending(_choice(n, r, ("auto", "0", "1"))),
        ),
        "FASTBACKUP_FSYNC": ("fsync", _bool),
        "FASTBACKUP_DIRECT_IO": ("direct_io", _bool),
        "FASTBACKUP_ON_ERROR": (
            "on_error",
            lambda n, r: _choice(n, r, ("raise", "warn")),
        ),
        "FASTBACKUP_LOG_LEVEL": (
            "log_level",
            lambda n, r: _choice(n, r, _LOG_LEVELS),
        ),
        "FASTBACKUP_RESUME_MID_EPOCH": ("resume_mid_epoch", _bool),
        "FASTBACKUP_HANDLE_SIGTERM": ("handle_sigterm", _bool),
        "FASTBACKUP_OVERLAP": ("overlap", _bool),
        "FASTBACKUP_LEASE_SECONDS": ("lease_seconds", _seconds),
        "FASTBACKUP_LEASE_WAIT_SECONDS": ("lease_wait_seconds", _seconds),
        "FASTBACKUP_RETRY_SECONDS": ("retry_seconds", _seconds),
        "FASTBACKUP_REQUEST_TIMEOUT_SECONDS": (
            "request_timeout_seconds", _seconds),
        "FASTBACKUP_PEER_TIMEOUT_SECONDS": ("peer_timeout_seconds", _seconds),
    }
    # Variables that are read elsewhere, before any callback exists.
    known_elsewhere = {"FASTBACKUP_PURE_PYTHON"}
    for name, raw in env.items():
        if not name.startswith("FASTBACKUP_"):
            continue
        if name in parsers:
            field, parse = parsers[name]
            kwargs[field] = parse(name, raw)
        elif name not in known_elsewhere:
            accepted = ", ".join(sorted(set(parsers) | known_elsewhere))
            raise ConfigError(
                f"Unknown environment variable `{name}`. "
                f"Received: {name}={raw!r}. Known variables: {accepted}."
            )
    config = Config(**kwargs)  # type: ignore[arg-type]
    if config.log_level is not None:
        logging.getLogger("fastbackup").setLevel(config.log_level.upper())
    return config
