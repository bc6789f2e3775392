"""Command-line tools: `python -m fastbackup inspect | verify | export | bench`.

* `inspect DIR` describes every checkpoint of a backup directory.

DIR is a local directory (or one checkpoint file) or an object-store URL
(`s3://bucket/prefix`, `gs://bucket/prefix`); a URL lists only committed
checkpoints, and reports uncommitted uploads as leftover temporary files.
* `verify DIR` checks every checkpoint's checksums; exit status 1 when any
  is damaged.
* `export DIR OUT.weights.h5 [--model M]` writes the newest valid
  checkpoint as a Keras weights file, through the model rebuilt from the
  config stored in the backup, or one of the same architecture.
* `bench ARGS...` runs the benchmark harness (`python -m benchmarks ARGS`).

Exit status: 0 success; 1 a damaged checkpoint was found, or `export` found
no checkpoint it could restore; 2 a usage error (bad arguments, a missing or
foreign directory, a model that cannot be loaded, no benchmark harness).
Reports go to stdout, errors to stderr. Nothing in a backup directory is
ever modified: leftover temporary files are reported, not deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

from fastbackup.errors import CheckpointCorruptError, CheckpointMismatchError
from fastbackup.format import CheckpointReader
from fastbackup.stores.base import LocationStore
from fastbackup.stores.local import LOCK_NAME, LocalStore
from fastbackup.stores.location import is_url, open_store
from fastbackup.stores.names import MODEL_CONFIG_NAME

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """An error of the command line or its inputs; exit status 2."""


class CommandFailed(Exception):
    """The command ran but could not do its job; exit status 1."""


# Backup directories --------------------------------------------------------


@dataclasses.dataclass
class Target:
    """What a DIR argument designates."""

    location: str  # a directory, or a bucket URL
    checkpoints: list[tuple[int | None, str]]  # newest first
    temp_files: list[str]
    lock_file: bool
    store: LocationStore


def _resolve(path: str) -> Target:
    """Validates a DIR argument: a backup directory or one checkpoint file.

    Raises:
        UsageError: `path` does not exist, or is a directory holding neither
            a checkpoint nor fastbackup's lock or temporary files.
    """
    if is_url(path):
        return _resolve_url(path)
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        # A single checkpoint, e.g. one copied out of its directory.
        directory = os.path.dirname(path) or "."
        return Target(directory, [(None, path)], [], False,
                      LocalStore(directory))
    if not os.path.isdir(path):
        raise UsageError(f"{path}: not a directory or a checkpoint file")
    store = LocalStore(path)
    try:
        checkpoints = store.list_checkpoints()
    except OSError as e:
        raise UsageError(f"{path}: cannot list the directory: {e}") from None
    temps = store.list_temp_files()
    lock = os.path.exists(os.path.join(path, LOCK_NAME))
    if not checkpoints and not temps and not lock:
        raise UsageError(
            f"{path}: not a fastbackup backup directory (it holds no "
            f"ckpt-<step>.fbk checkpoint and no {LOCK_NAME} file)"
        )
    return Target(path, list(checkpoints), temps, lock, store)


def _resolve_url(url: str) -> Target:
    try:
        store = open_store(url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        checkpoints = store.list_checkpoints()
        temps = store.list_temp_files()
        present = bool(checkpoints or temps) or store.exists()
    except OSError as e:
        raise UsageError(f"{url}: cannot read the backup: {e}") from None
    if not present:
        raise UsageError(f"{url}: no fastbackup backup there (nothing under "
                         "this prefix)")
    return Target(store.location, list(checkpoints), temps, False, store)


# Reading checkpoints ---------------------------------------------------------


@dataclasses.dataclass
class Report:
    """What `inspect` and `verify` learn about one checkpoint."""

    file: str
    status: str  # "ok", "damaged", "unverified" or "vanished"
    error: str | None = None
    step: int | None = None
    epoch: int | None = None
    batch: int | None = None
    created: float | None = None
    format_version: int | None = None
    file_size: int | None = None
    stored_bytes: int | None = None
    raw_bytes: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    tensors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # A multi-process checkpoint's part files, in process order.
    parts: list[str] = dataclasses.field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if not self.stored_bytes or self.raw_bytes is None:
            return None
        return self.raw_bytes / self.stored_bytes

    def as_json(self, now: float, with_tensors: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "status": self.status,
            "error": self.error,
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
        }
        if with_tensors:
            out.update(
                created=self.created,
                age_seconds=(
                    None if self.created is None else max(now - self.created, 0.0)
                ),
                format_version=self.format_version,
                file_size=self.file_size,
                stored_bytes=self.stored_bytes,
                raw_bytes=self.raw_bytes,
                compression_ratio=self.ratio,
                extra=self.extra,
                tensors=self.tensors,
                parts=self.parts,
            )
        return out


def _json_safe(value: Any) -> Any:
    """Header `extra` values as JSON can hold them (bytes become hex)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return value


def _examine(store: LocationStore, path: str, verify: bool) -> Report:
    """Opens, describes and (optionally) fully verifies one checkpoint."""
    report = Report(file=path, status="unverified")
    try:
        reader = store.open_checkpoint(path)
    except FileNotFoundError:
        # A running training prunes its older checkpoints.
        report.status = "vanished"
        report.error = "removed while being read (pruned by a running training?)"
        return report
    except CheckpointCorruptError as e:
        report.status, report.error = "damaged", e.reason
        return report
    except OSError as e:
        report.status, report.error = "damaged", f"cannot be read: {e}"
        return report
    with reader:
        meta = reader.meta
        report.step, report.epoch, report.batch = (
            reader.step, reader.epoch, reader.batch,
        )
        created = meta.get("created")
        if isinstance(created, (int, float)) and not isinstance(created, bool):
            report.created = float(created)
        report.extra = _json_safe(meta.get("extra", {}))
        report.format_version = reader.version
        report.parts = [p["name"] for p in reader.parts]
        parts = None
        try:
            if reader.is_manifest:
                # The state is in the parts, which the manifest vouches for.
                from fastbackup import restore

                parts = restore.ManifestParts(store, reader)
                readers = parts.readers
            else:
                readers = [reader]
        except CheckpointCorruptError as e:
            report.status, report.error = "damaged", e.reason
            return report
        except OSError as e:
            report.status, report.error = "damaged", f"cannot be read: {e}"
            return report
        try:
            _describe_tensors(report, reader, readers)
            if verify:
                _verify(report, readers)
        finally:
            if parts is not None:
                parts.close()
    return report


def _describe_tensors(
    report: Report, reader: CheckpointReader, readers: list[CheckpointReader]
) -> None:
    entries = [e for r in readers for e in r.entries]
    report.file_size = reader.file_size + sum(
        r.file_size for r in readers if r is not reader)
    report.stored_bytes = sum(e.stored_size for e in entries)
    report.raw_bytes = sum(e.raw_size for e in entries)
    report.tensors = []
    for e in entries:
        tensor = {
            "name": e.name,
            "path": e.path,
            "dtype": e.dtype,
            "shape": list(e.shape),
            "codec": e.codec,
            "stored_size": e.stored_size,
            "raw_size": e.raw_size,
            "crc32c": f"{e.crc32c:08x}",
        }
        if e.global_shape is not None:
            tensor["global_shape"] = list(e.global_shape)
            tensor["start"] = list(e.offsets)
        report.tensors.append(tensor)


def _verify(report: Report, readers: list[CheckpointReader]) -> None:
    try:
        for r in readers:
            r.verify()
    except CheckpointCorruptError as e:
        report.status = "damaged"
        report.error = e.reason if len(readers) == 1 else str(e)
    except OSError as e:
        report.status, report.error = "damaged", f"cannot be read: {e}"
    else:
        report.status = "ok"


# Formatting ------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def _position(r: Report) -> str:
    return f"step {r.step}, epoch {r.epoch}, batch {r.batch}"


def _table(rows: list[list[str]], out: TextIO, indent: str) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths)]
        out.write(indent + "  ".join(cells).rstrip() + "\n")


def _print_inspect(r: Report, now: float, out: TextIO) -> None:
    out.write(f"{os.path.basename(r.file)}\n")
    if r.step is None:
        out.write(f"  status:    DAMAGED: {r.error}\n")
        return
    when = "unknown"
    if r.created is not None:
        stamp = datetime.datetime.fromtimestamp(r.created).isoformat(
            sep=" ", timespec="seconds"
        )
        when = f"{stamp} ({_age(now - r.created)})"
    status = {
        "ok": "ok (every checksum verified)",
        "unverified": "not verified (--no-verify)",
        "damaged": f"DAMAGED: {r.error}",
        "vanished": f"vanished: {r.error}",
    }[r.status]
    ratio = r.ratio
    out.write(f"  position:  {_position(r)}\n")
    out.write(f"  created:   {when}\n")
    out.write(f"  checksums: {status}\n")
    files = f"{len(r.parts) + 1} files" if r.parts else "file"
    out.write(
        f"  size:      {_size(r.file_size)} {files} (format version "
        f"{r.format_version}); tensors "
        f"{_size(r.stored_bytes)} stored, {_size(r.raw_bytes)} raw "
        f"(compression ratio {'-' if ratio is None else f'{ratio:.2f}'})\n"
    )
    if r.extra:
        extra = ", ".join(f"{k}={v!r}" for k, v in r.extra.items())
        out.write(f"  metadata:  {extra}\n")
    if r.parts:
        out.write(f"  parts:     {len(r.parts)} (one per process of a "
                  f"multi-process job): {', '.join(r.parts)}\n")
    out.write(f"  variables: {len(r.tensors)}"
              + (" shards" if r.parts else "") + "\n")
    if r.tensors:
        rows = [["name", "keras path", "dtype", "shape", "codec", "stored",
                 "raw"]]
        for t in r.tensors:
            shape = str(tuple(t["shape"]))
            if "global_shape" in t:
                shape += f" at {tuple(t['start'])} of {tuple(t['global_shape'])}"
            rows.append([
                t["name"], t["path"], t["dtype"], shape,
                t["codec"], _size(t["stored_size"]), _size(t["raw_size"]),
            ])
        _table(rows, out, "    ")


# Commands --------------------------------------------------------------------


def _examine_all(target: Target, verify: bool) -> list[Report]:
    reports = [_examine(target.store, path, verify)
               for _, path in target.checkpoints]
    return [r for r in reports if r.status != "vanished"]


def _exit_status(reports: list[Report]) -> int:
    return EXIT_DAMAGED if any(r.status == "damaged" for r in reports) else EXIT_OK


def _model_config_report(store: LocationStore) -> dict[str, Any] | None:
    """What the stored model config file says, for `inspect`."""
    path = os.path.join(store.location, MODEL_CONFIG_NAME)
    try:
        data = store.read_object(MODEL_CONFIG_NAME)
    except (OSError, ValueError) as e:
        return {"file": path, "error": str(e)}
    if data is None:
        return None
    from fastbackup import model_config

    report: dict[str, Any] = {
        "file": path,
        "crc32c": model_config.checksum(data),
    }
    try:
        document = json.loads(data)
    except ValueError as e:
        report["error"] = f"not valid JSON: {e}"
        return report
    if not isinstance(document, dict):
        report["error"] = "not a model config"
        return report
    report.update(
        class_name=document.get("class_name"),
        stored=document.get("config") is not None,
        reason=document.get("reason"),
        keras_version=document.get("keras_version"),
        backend=document.get("backend"),
    )
    return report


def _print_model_config(report: dict[str, Any] | None, out: TextIO) -> None:
    if report is None:
        out.write("model config: none stored (export needs --model or "
                  "--model-factory)\n\n")
    elif "error" in report:
        out.write(f"model config: unreadable: {report['error']}\n\n")
    elif report["stored"]:
        out.write(
            f"model config: {report['class_name']} (Keras "
            f"{report['keras_version']}, CRC-32C {report['crc32c']:08x}); "
            "export needs no --model\n\n"
        )
    else:
        out.write(f"model config: not stored: {report['reason']}\n\n")


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    target = _resolve(args.dir)
    reports = _examine_all(target, verify=not args.no_verify)
    now = time.time()
    single = len(target.checkpoints) == 1 and target.checkpoints[0][0] is None
    config = _model_config_report(target.store)
    if args.json:
        json.dump(
            {
                "directory": target.location,
                "lock_file": target.lock_file,
                "model_config": config,
                "checkpoints": [r.as_json(now, True) for r in reports],
                "temp_files": target.temp_files,
            },
            out,
            indent=2,
        )
        out.write("\n")
        return _exit_status(reports)
    if single:
        out.write(f"checkpoint file {args.dir}\n\n")
    else:
        out.write(
            f"backup directory {target.location}: {len(reports)} "
            f"checkpoint(s), newest first\n\n"
        )
        _print_model_config(config, out)
    for r in reports:
        _print_inspect(r, now, out)
        out.write("\n")
    for path in target.temp_files:
        out.write(
            f"leftover temporary file {os.path.basename(path)} "
            f"({_size(_file_size(path))}): an interrupted write, or one in "
            "progress\n"
        )
    return _exit_status(reports)


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    target = _resolve(args.dir)
    reports = _examine_all(target, verify=True)
    damaged = [r for r in reports if r.status == "damaged"]
    newest = next((r for r in reports if r.status == "ok"), None)
    if args.json:
        json.dump(
            {
                "directory": target.location,
                "ok": not damaged,
                "checkpoints": [r.as_json(0.0, False) for r in reports],
                "newest_valid": None if newest is None else newest.file,
                "temp_files": target.temp_files,
            },
            out,
            indent=2,
        )
        out.write("\n")
        return _exit_status(reports)
    for r in reports:
        name = os.path.basename(r.file)
        if r.status == "ok":
            out.write(
                f"ok       {name}  {_position(r)}, {len(r.tensors)} "
                f"variables, {_size(r.file_size)}\n"
            )
        else:
            out.write(f"DAMAGED  {name}  {r.error}\n")
    for path in target.temp_files:
        out.write(
            f"temp     {os.path.basename(path)}  leftover temporary file: an "
            "interrupted write, or one in progress (not deleted; the next "
            "training run on this directory removes it)\n"
        )
    summary = (
        f"{len(reports)} checkpoint(s): {len(reports) - len(damaged)} ok, "
        f"{len(damaged)} damaged"
    )
    if target.temp_files:
        summary += f"; {len(target.temp_files)} temporary file(s)"
    out.write(summary + "\n")
    if newest is not None:
        out.write(
            f"newest valid checkpoint: {os.path.basename(newest.file)} "
            f"({_position(newest)})\n"
        )
    elif not reports:
        out.write("no checkpoint in this directory\n")
    return _exit_status(reports)


def _load_factory(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"--model-factory {spec!r}: expected 'package.module:function'"
        )
    # Like `python -m`, find modules in the current directory.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UsageError(
            f"--model-factory {spec!r}: cannot import {module_name!r}: {e}"
        ) from e
    factory: Any = module
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise UsageError(
                f"--model-factory {spec!r}: {module_name!r} has no "
                f"attribute {attr!r}"
            ) from None
    if not callable(factory):
        raise UsageError(f"--model-factory {spec!r}: {attr!r} is not callable")
    try:
        return factory()
    except Exception as e:
        raise UsageError(
            f"--model-factory {spec!r}: {attr}() raised "
            f"{type(e).__name__}: {e}"
        ) from e


def _load_model(args: argparse.Namespace) -> Any:
    import keras

    if args.model is not None:
        if not os.path.isfile(args.model):
            raise UsageError(f"--model {args.model}: no such file")
        try:
            with warnings.catch_warnings():
                # The file's own optimizer state is replaced by the
                # checkpoint's; Keras warns when it cannot load it.
                warnings.filterwarnings(
                    "ignore", message="Skipping variable loading for optimizer"
                )
                model = keras.saving.load_model(args.model)
        except Exception as e:
            raise UsageError(
                f"--model {args.model}: cannot load the model: {e}"
            ) from e
        source = args.model
    else:
        model = _load_factory(args.model_factory)
        source = args.model_factory
    if not isinstance(model, keras.Model):
        raise UsageError(
            f"{source}: expected a keras.Model, got {type(model).__name__}"
        )
    return _ready_for_export(model, source)


def _stored_model(store: LocationStore, reader: CheckpointReader) -> Any:
    """The model rebuilt from the config stored beside the checkpoints.

    Raises:
        CommandFailed: no usable config; the message says to pass the model.
    """
    from fastbackup import model_config

    path = os.path.join(store.location, MODEL_CONFIG_NAME)
    hint = "; pass the model with --model or --model-factory"
    try:
        data = store.read_object(MODEL_CONFIG_NAME)
        if data is None:
            raise model_config.ModelConfigError(
                f"{path} does not exist (the backup was written by a "
                "fastbackup that did not store the model's config)"
            )
        extra = reader.meta.get("extra", {})
        crc = extra.get("model_config")
        document = model_config.parse(
            data, crc if isinstance(crc, int) else None, path
        )
        model = model_config.rebuild(document, path)
    except (model_config.ModelConfigError, OSError, ValueError) as e:
        raise CommandFailed(f"cannot export without the model: {e}{hint}") from e
    return _ready_for_export(model, path)


def _ready_for_export(model: Any, source: str) -> Any:
    """Checks that `model` can receive a checkpoint; builds its optimizer."""
    if not model.built:
        raise UsageError(
            f"{source}: the model is not built; build it (for example with "
            "`keras.Input` or `model.build(input_shape)`) before exporting"
        )
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise UsageError(
            f"{source}: the model is not compiled; compile it with the "
            "optimizer used in training, whose state the checkpoint holds"
        )
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    return model


def cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    output = os.fspath(args.out)
    if not output.endswith(".weights.h5"):
        raise UsageError(
            f"{output}: the output file name must end in `.weights.h5` "
            "(Keras's `load_weights` reads weights files by that suffix)"
        )
    if os.path.exists(output) and not args.overwrite:
        raise UsageError(f"{output}: file exists (use --overwrite to replace it)")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise UsageError(f"{output}: directory {out_dir} does not exist")
    target = _resolve(args.dir)
    candidates = target.checkpoints
    if args.step is not None:
        candidates = [(s, p) for s, p in candidates if s == args.step]
        if not candidates:
            raise CommandFailed(
                f"{args.dir}: no checkpoint with step {args.step}"
            )
    if not candidates:
        raise CommandFailed(f"{args.dir}: no checkpoint to export")
    given = args.model is not None or args.model_factory is not None
    model = _load_model(args) if given else None

    from fastbackup import restore

    chosen = None
    for _, path in candidates:
        try:
            with target.store.open_checkpoint(path) as reader:
                if model is None:
                    # Rebuilt for the newest readable checkpoint, whose
                    # header vouches for the stored config.
                    model = _stored_model(target.store, reader)
                # read_state verifies every tensor's checksum as it reads.
                values = restore.read_state(reader, model, target.store)
                chosen = (path, reader.step, reader.epoch, reader.batch)
        except FileNotFoundError:
            continue
        except CheckpointCorruptError as e:
            sys.stderr.write(f"fastbackup: skipping damaged checkpoint: {e}\n")
            continue
        except CheckpointMismatchError as e:
            raise CommandFailed(
                f"{e} The model given to export must have the architecture, "
                "optimizer and compiled metrics of the trained one."
            ) from e
        break
    if chosen is None:
        raise CommandFailed(f"{args.dir}: no valid checkpoint to export")
    for variable, value in values:
        variable.assign(value)
    # Keras writes in place; write next to the target and rename, so that
    # an interrupted export never leaves a torn file under the final name.
    base = os.path.basename(output)
    tmp = os.path.join(out_dir, f".{base[: -len('.weights.h5')]}.{os.getpid()}"
                                f".tmp.weights.h5")
    try:
        model.save_weights(tmp)
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    path, step, epoch, batch = chosen
    weights, optimizer = _count_arrays(output)
    out.write(
        f"exported {os.path.basename(path)} (step {step}, epoch {epoch}, "
        f"batch {batch}) to {output}: {weights + optimizer} arrays, "
        f"{weights} of the model and {optimizer} of the optimizer (a Keras "
        "weights file holds no seed generator or metric state)\n"
    )
    # `load_weights` restores the optimizer's state only into a built
    # optimizer; into a freshly compiled model it warns "Skipping variable
    # loading for optimizer" and training restarts its moments from zero.
    resume = [
        ("to resume training from it, in a model built and compiled as in "
         "training:"),
        "    model.optimizer.build(model.trainable_variables)",
        f"    model.load_weights({output!r})",
    ]
    if epoch:
        # The weights file does not record the epoch.
        resume.append(f"    model.fit(..., initial_epoch={epoch})")
    out.write("\n".join(resume) + "\n")
    return EXIT_OK


def _count_arrays(weights_file: str) -> tuple[int, int]:
    """`(model arrays, optimizer arrays)` of a Keras weights file."""
    import h5py

    counts = [0, 0]

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            counts[name.split("/", 1)[0] == "optimizer"] += 1

    with h5py.File(weights_file, "r") as f:
        f.visititems(visit)
    return counts[0], counts[1]


def _find_benchmarks() -> str | None:
    """Directory of the `benchmarks` package `python -m` would run, if any.

    Searched like `python -m benchmarks` does: the current directory first,
    then `sys.path`.
    """
    search = [os.getcwd()] + [p or os.getcwd() for p in sys.path]
    spec = importlib.machinery.PathFinder.find_spec("benchmarks", search)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(location, "__main__.py")):
            return location
    return None


def cmd_bench(argv: Sequence[str]) -> int:
    if _find_benchmarks() is None:
        raise UsageError(
            "the benchmark harness is not importable: it is the top-level "
            "`benchmarks` package of the fastbackup source tree, not part of "
            "the installed wheel. Run this command from the source tree, "
            "after `python3 -m pip install '.[bench]'` there"
        )
    try:
        return subprocess.call([sys.executable, "-m", "benchmarks", *argv])
    except KeyboardInterrupt:  # the harness got the signal too
        return 130


# Entry point -----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastbackup",
        description="Inspect, verify and export fastbackup checkpoints.",
        epilog="Exit status: 0 ok, 1 a damaged checkpoint or a failed "
        "export, 2 usage error.",
    )
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="describe every checkpoint of a backup directory",
        description="Describe every checkpoint of a backup directory: "
        "training position, variables, sizes, codecs, checksum status, age.",
    )
    p.add_argument("dir", metavar="DIR",
                   help="backup directory (or one checkpoint file)")
    p.add_argument("--json", action="store_true",
                   help="print machine-readable JSON")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reading every tensor to check its checksum")

    p = sub.add_parser(
        "verify",
        help="check every checkpoint's checksums",
        description="Check every checkpoint of a backup directory; exit "
        "status 1 if any is damaged. Leftover temporary files are reported, "
        "not deleted.",
    )
    p.add_argument("dir", metavar="DIR",
                   help="backup directory (or one checkpoint file)")
    p.add_argument("--json", action="store_true",
                   help="print machine-readable JSON")

    p = sub.add_parser(
        "export",
        help="write the newest valid checkpoint as a Keras .weights.h5 file",
        description="Restore the newest valid checkpoint into a model of the "
        "same architecture and write it with `model.save_weights`, so that "
        "`model.load_weights(OUT)` reads it. The model is rebuilt from the "
        "config the callback stored in the backup, or given with --model or "
        "--model-factory (needed for a subclassed model).",
    )
    p.add_argument("dir", metavar="DIR",
                   help="backup directory (or one checkpoint file)")
    p.add_argument("out", metavar="OUT.weights.h5", help="file to write")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH",
                        help="a saved Keras model (.keras) of the same "
                        "architecture, compiled with the same optimizer "
                        "(default: the model config stored in the backup)")
    source.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                        help="a function returning a built, compiled model "
                        "of the same architecture")
    p.add_argument("--step", type=int, default=None,
                   help="export this checkpoint instead of the newest valid")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists")

    sub.add_parser(
        "bench",
        help="run the benchmark harness (python -m benchmarks ARGS...)",
        description="Run `python -m benchmarks` with the remaining "
        "arguments; `fastbackup bench --help` shows the harness's options.",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            # Every argument belongs to the harness, `--help` included.
            return cmd_bench(argv[1:])
        args = _parser().parse_args(argv)
        command = {"inspect": cmd_inspect, "verify": cmd_verify,
                   "export": cmd_export}[args.command]
        return command(args, sys.stdout)
    except UsageError as e:
        sys.stderr.write(f"fastbackup: error: {e}\n")
        return EXIT_USAGE
    except CommandFailed as e:
        sys.stderr.write(f"fastbackup: error: {e}\n")
        return EXIT_DAMAGED
    except SystemExit as e:  # argparse: --help, or a usage error
        if e.code is None:
            return EXIT_OK
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except BrokenPipeError:
        # `fastbackup inspect DIR | head`: the reader left; say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_DAMAGED
