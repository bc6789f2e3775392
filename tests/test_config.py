"""Tests of `fastbackup.config`: every `FASTBACKUP_*` variable."""

from __future__ import annotations

import dataclasses
import logging

import pytest

import fastbackup
from fastbackup import config
from fastbackup.errors import ConfigError

BOOL_TRUE = ["1", "true", "yes", "on", "TRUE", " On "]
BOOL_FALSE = ["0", "false", "no", "off", "False", " NO "]
BOOL_ACCEPTED = "1, true, yes, on, 0, false, no, off"


@pytest.fixture(autouse=True)
def _restore_logger_level():
    logger = logging.getLogger("fastbackup")
    level = logger.level
    yield
    logger.setLevel(level)


def parse(**env: str) -> config.Config:
    return config.from_environ(env)


def assert_rejected(name: str, raw: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_environ({name: raw})
    message = str(info.value)
    assert f"`{name}`" in message
    assert f"{name}={raw!r}" in message
    assert accepted in message


# Defaults ----------------------------------------------------------------------


def test_defaults():
    c = config.from_environ({})
    assert c == config.Config()
    assert c.compression_level == 1
    assert c.on_busy == "coalesce"
    assert c.pending_snapshots is None  # automatic: by the state's size
    assert c.fsync is True
    assert c.on_error == "raise"
    assert c.log_level is None
    assert c.resume_mid_epoch is False
    assert c.handle_sigterm is False
    assert c.overlap is False
    assert c.lease_seconds == 60.0
    assert c.lease_wait_seconds == 120.0
    assert c.retry_seconds == 180.0
    assert c.request_timeout_seconds == 120.0
    assert c.peer_timeout_seconds == 300.0


def test_config_is_frozen():
    c = config.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.fsync = False  # type: ignore[misc]
    assert c.fsync is True


def test_other_variables_are_ignored():
    assert parse(PATH="/bin", FASTBACKUPX="1", fastbackup_fsync="0") == (
        config.Config())


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")
    monkeypatch.setenv("FASTBACKUP_FSYNC", "off")
    c = config.from_environ()
    assert c.on_busy == "wait" and c.fsync is False


# FASTBACKUP_COMPRESSION --------------------------------------------------------


@pytest.mark.parametrize("raw", ["off", "OFF", "none", "0", "false", "no"])
def test_compression_off(raw):
    assert parse(FASTBACKUP_COMPRESSION=raw).compression_level is None


@pytest.mark.parametrize("raw, level", [
    ("1", 1), ("-7", -7), ("22", 22), ("3", 3), (" 9 ", 9), ("-1", -1)])
def test_compression_levels(raw, level):
    assert parse(FASTBACKUP_COMPRESSION=raw).compression_level == level


@pytest.mark.parametrize("raw", ["23", "-8", "fast", "1.5", "", "on", "zstd"])
def test_compression_invalid(raw):
    assert_rejected("FASTBACKUP_COMPRESSION", raw, "from -7 to 22")
    with pytest.raises(ConfigError, match="'off'"):
        parse(FASTBACKUP_COMPRESSION=raw)


# FASTBACKUP_ON_BUSY ------------------------------------------------------------


@pytest.mark.parametrize("raw, value", [
    ("coalesce", "coalesce"), ("wait", "wait"), ("WAIT", "wait"),
    (" Coalesce ", "coalesce")])
def test_on_busy(raw, value):
    assert parse(FASTBACKUP_ON_BUSY=raw).on_busy == value


@pytest.mark.parametrize("raw", ["block", "", "queue", "1"])
def test_on_busy_invalid(raw):
    assert_rejected("FASTBACKUP_ON_BUSY", raw, "coalesce, wait")


# FASTBACKUP_PENDING_SNAPSHOTS -------------------------------------------------


@pytest.mark.parametrize("raw, value", [("0", 0), ("1", 1), (" 1 ", 1)])
def test_pending_snapshots(raw, value):
    c = parse(FASTBACKUP_PENDING_SNAPSHOTS=raw)
    assert c.pending_snapshots == value and isinstance(c.pending_snapshots, int)


@pytest.mark.parametrize("raw", ["auto", " AUTO "])
def test_pending_snapshots_auto(raw):
    assert parse(FASTBACKUP_PENDING_SNAPSHOTS=raw).pending_snapshots is None


@pytest.mark.parametrize("raw", ["2", "-1", "one", "", "01"])
def test_pending_snapshots_invalid(raw):
    assert_rejected("FASTBACKUP_PENDING_SNAPSHOTS", raw, "auto, 0, 1")


# Booleans ----------------------------------------------------------------------

BOOLEANS = [
    ("FASTBACKUP_FSYNC", "fsync"),
    ("FASTBACKUP_RESUME_MID_EPOCH", "resume_mid_epoch"),
    ("FASTBACKUP_HANDLE_SIGTERM", "handle_sigterm"),
    ("FASTBACKUP_OVERLAP", "overlap"),
]


@pytest.mark.parametrize("name, field", BOOLEANS)
@pytest.mark.parametrize("raw", BOOL_TRUE)
def test_booleans_true(name, field, raw):
    assert getattr(parse(**{name: raw}), field) is True


@pytest.mark.parametrize("name, field", BOOLEANS)
@pytest.mark.parametrize("raw", BOOL_FALSE)
def test_booleans_false(name, field, raw):
    assert getattr(parse(**{name: raw}), field) is False


@pytest.mark.parametrize("name, field", BOOLEANS)
@pytest.mark.parametrize("raw", ["2", "", "enabled", "y", "nope"])
def test_booleans_invalid(name, field, raw):
    assert_rejected(name, raw, BOOL_ACCEPTED)


# FASTBACKUP_ON_ERROR -----------------------------------------------------------


@pytest.mark.parametrize("raw, value", [
    ("raise", "raise"), ("warn", "warn"), ("Warn", "warn")])
def test_on_error(raw, value):
    assert parse(FASTBACKUP_ON_ERROR=raw).on_error == value


@pytest.mark.parametrize("raw", ["ignore", "warning", ""])
def test_on_error_invalid(raw):
    assert_rejected("FASTBACKUP_ON_ERROR", raw, "raise, warn")


# FASTBACKUP_LOG_LEVEL ----------------------------------------------------------


@pytest.mark.parametrize("raw", ["debug", "info", "warning", "error",
                                 "critical", "DEBUG", " Info "])
def test_log_level_sets_the_fastbackup_logger(raw):
    c = parse(FASTBACKUP_LOG_LEVEL=raw)
    assert c.log_level == raw.strip().lower()
    assert logging.getLogger("fastbackup").level == getattr(
        logging, raw.strip().upper())


def test_log_level_unset_leaves_the_logger_alone():
    logger = logging.getLogger("fastbackup")
    logger.setLevel(logging.ERROR)
    assert parse().log_level is None
    assert logger.level == logging.ERROR


@pytest.mark.parametrize("raw", ["warn", "trace", "10", ""])
def test_log_level_invalid(raw):
    logger = logging.getLogger("fastbackup")
    logger.setLevel(logging.ERROR)
    assert_rejected("FASTBACKUP_LOG_LEVEL", raw,
                    "debug, info, warning, error, critical")
    assert logger.level == logging.ERROR


# Durations (seconds) -----------------------------------------------------------

DURATIONS = [
    ("FASTBACKUP_LEASE_SECONDS", "lease_seconds"),
    ("FASTBACKUP_LEASE_WAIT_SECONDS", "lease_wait_seconds"),
    ("FASTBACKUP_RETRY_SECONDS", "retry_seconds"),
    ("FASTBACKUP_REQUEST_TIMEOUT_SECONDS", "request_timeout_seconds"),
    ("FASTBACKUP_PEER_TIMEOUT_SECONDS", "peer_timeout_seconds"),
]


@pytest.mark.parametrize("name, field", DURATIONS)
@pytest.mark.parametrize("raw, value", [
    ("0.5", 0.5), ("2", 2.0), (" 90 ", 90.0), ("86400", 86400.0)])
def test_durations(name, field, raw, value):
    assert getattr(parse(**{name: raw}), field) == value


@pytest.mark.parametrize("name, field", DURATIONS)
@pytest.mark.parametrize("raw", ["0", "0.4", "-1", "86401", "90000", "nan",
                                 "inf", "", "1m", "abc"])
def test_durations_invalid(name, field, raw):
    assert_rejected(name, raw, "from 0.5 to 86400")


@pytest.mark.parametrize("name, field", [
    (n, f) for n, f in DURATIONS if n != "FASTBACKUP_PEER_TIMEOUT_SECONDS"])
def test_store_durations_read_outside_a_callback(monkeypatch, name, field):
    # The CLI opens stores without a callback: the same variable, the same
    # validation, the same default.
    assert config.seconds_from_environ(name) == getattr(config.Config, field)
    monkeypatch.setenv(name, "7.5")
    assert config.seconds_from_environ(name) == 7.5
    monkeypatch.setenv(name, "0")
    with pytest.raises(ConfigError, match=f"{name}='0'"):
        config.seconds_from_environ(name)


# Unknown and out-of-band variables ---------------------------------------------


@pytest.mark.parametrize("name", ["FASTBACKUP_COMPRESION", "FASTBACKUP_",
                                  "FASTBACKUP_fsync", "FASTBACKUP_SAVE_FREQ"])
def test_unknown_variable_is_rejected(name):
    with pytest.raises(ConfigError) as info:
        parse(**{name: "1"})
    message = str(info.value)
    assert f"Unknown environment variable `{name}`" in message
    assert f"{name}='1'" in message
    for known in ("FASTBACKUP_COMPRESSION", "FASTBACKUP_FSYNC",
                  "FASTBACKUP_HANDLE_SIGTERM", "FASTBACKUP_LOG_LEVEL",
                  "FASTBACKUP_ON_BUSY", "FASTBACKUP_ON_ERROR",
                  "FASTBACKUP_PENDING_SNAPSHOTS", "FASTBACKUP_PURE_PYTHON",
                  "FASTBACKUP_RESUME_MID_EPOCH", "FASTBACKUP_OVERLAP",
                  "FASTBACKUP_LEASE_WAIT_SECONDS",
                  "FASTBACKUP_REQUEST_TIMEOUT_SECONDS"):
        assert known in message


@pytest.mark.parametrize("raw", ["1", "0", "anything"])
def test_pure_python_is_read_elsewhere_and_accepted(raw):
    # `fastbackup._compat` reads it at import time, before any callback.
    assert parse(FASTBACKUP_PURE_PYTHON=raw) == config.Config()


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        parse(FASTBACKUP_FSYNC="maybe")
    assert issubclass(ConfigError, fastbackup.FastBackupError)


def test_every_variable_at_once():
    c = parse(
        FASTBACKUP_COMPRESSION="5",
        FASTBACKUP_ON_BUSY="wait",
        FASTBACKUP_PENDING_SNAPSHOTS="1",
        FASTBACKUP_FSYNC="0",
        FASTBACKUP_ON_ERROR="warn",
        FASTBACKUP_LOG_LEVEL="info",
        FASTBACKUP_RESUME_MID_EPOCH="yes",
        FASTBACKUP_HANDLE_SIGTERM="on",
        FASTBACKUP_OVERLAP="on",
        FASTBACKUP_LEASE_SECONDS="30",
        FASTBACKUP_LEASE_WAIT_SECONDS="45",
        FASTBACKUP_RETRY_SECONDS="20",
        FASTBACKUP_REQUEST_TIMEOUT_SECONDS="15",
        FASTBACKUP_PEER_TIMEOUT_SECONDS="50",
        FASTBACKUP_PURE_PYTHON="0",
    )
    assert c == config.Config(
        compression_level=5, on_busy="wait", pending_snapshots=1, fsync=False,
        on_error="warn", log_level="info", resume_mid_epoch=True,
        handle_sigterm=True, overlap=True, lease_seconds=30.0,
        lease_wait_seconds=45.0, retry_seconds=20.0, peer_timeout_seconds=50.0,
        request_timeout_seconds=15.0,
    )


# The callback reads the environment once, when it is constructed ---------------


def test_callback_reads_environment_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBACKUP_PENDING_SNAPSHOTS", "1")
    monkeypatch.setenv("FASTBACKUP_RESUME_MID_EPOCH", "on")
    cb = fastbackup.BackupAndRestore(tmp_path)
    monkeypatch.setenv("FASTBACKUP_PENDING_SNAPSHOTS", "0")
    assert cb.config.pending_snapshots == 1
    assert cb.resume_mid_epoch is True
    # An explicit argument wins over the environment.
    assert not fastbackup.BackupAndRestore(
        tmp_path, resume_mid_epoch=False).resume_mid_epoch


def test_callback_construction_fails_on_bad_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "sometimes")
    with pytest.raises(ConfigError, match="FASTBACKUP_ON_BUSY"):
        fastbackup.BackupAndRestore(tmp_path)
    assert not tmp_path.joinpath(".fastbackup.lock").exists()


@pytest.mark.parametrize("raw", ["00", "+0", "-0"])
def test_compression_zero_spelled_otherwise_is_off(raw):
    assert parse(FASTBACKUP_COMPRESSION=raw).compression_level is None


def test_invalid_pure_python_switch_fails_at_import():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import fastbackup.format"],
        env={**__import__("os").environ, "FASTBACKUP_PURE_PYTHON": "maybe"},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "FASTBACKUP_PURE_PYTHON='maybe'" in proc.stderr
