"""Section m: a model sharded over 4 CPU devices, in 1 process and in 2.

The same Dense MLP, under `keras.distribution.ModelParallel` on a `(batch=1,
model=4)` mesh with every hidden Dense kernel and bias sharded on `model`
(the head stays replicated), runs in two layouts:

- `1x4`: one process with 4 CPU devices (`JAX_NUM_CPU_DEVICES=4`);
- `2x2`: two processes with 2 CPU devices each, joined on 127.0.0.1 by
  `jax.distributed.initialize`, so the model axis crosses the processes and
  each process addresses half of every kernel.

In each layout every process, in rounds (the tools' order varies from round
to round), saves the same state with fastbackup's callback and with
`keras.callbacks.OrbaxCheckpoint`, then restores each tool's backup into a
fresh model of the same layout. Per process and per save:

- blocking: the time the training thread spends in the save
  (`cb.blocking_seconds`; Orbax: its callback's `_save_checkpoint`);
- durable: from the save's start until `wait_until_finished` returns (for
  fastbackup in 2 processes that includes process 0's commit of the
  manifest; for Orbax its own cross-process sync);
- fastbackup's writer time (`cb.stats.write_seconds`: encode, part write,
  agreement, commit) and bytes written (`cb.stats.bytes_written` delta);
- bytes the process caused to be written to storage (`write_bytes` of
  `/proc/self/io`, over the save until durable), the same measure for both
  tools;
- restore: fastbackup's `restore.restore_latest` and Keras's restore path for
  Orbax checkpoints, `model.load_weights(directory)` (it finds the latest
  step and reshards onto the model's layout; the callback itself restores
  nothing), each checked once to reproduce the saved state exactly.

Dirty pages are written back and the backups' cached pages dropped before
every timed operation, and the processes meet at a barrier (JAX's
coordination service) before each. Workers are subprocesses of the harness
(`python -m benchmarks.sharded --worker ...`), each wait has a timeout. Run
on its own with `python3 -m benchmarks.sharded [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# (processes, CPU devices per process); both give one (1, 4) mesh.
LAYOUTS = {"1x4": (1, 4), "2x2": (2, 2)}
TOOLS = ("fastbackup", "orbax")
_BARRIER_MS = 180_000


def model_spec(quick: bool) -> Any:
    """The section's MLP: ~38 MB of state quick, ~151 MB full."""
    from benchmarks.models import ModelSpec

    if quick:
        return ModelSpec(name="quick", units=1024, input_dim=1024, hidden_layers=3)
    return ModelSpec(name="full", units=2048, input_dim=2048, hidden_layers=3)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _io_write_bytes() -> int:
    """Bytes this process (all its threads) sent or dirtied for storage."""
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise KeyError("write_bytes")


# ---------------------------------------------------------------------------
# Worker side: one process of one layout.


class _Job:
    """This process's place in the job, and its barriers."""

    def __init__(self, processes: int, index: int) -> None:
        self.processes = processes
        self.index = index
        self._client: Any = None
        if processes > 1:
            from jax._src import distributed

            self._client = distributed.global_state.client
        self._n = 0

    def barrier(self, name: str) -> None:
        """Every process of the job reaches `name` (timeout: 3 minutes)."""
        self._n += 1
        if self._client is not None:
            self._client.wait_at_barrier(f"m-{self._n}-{name}", _BARRIER_MS)

    def all_ok(self, name: str, error: str | None) -> list[str | None]:
        """Every process's error (or None) at `name`, in process order."""
        if self._client is None:
            return [error]
        self._client.key_value_set(f"m-ok/{name}/{self.index}", error or "")
        return [self._client.blocking_key_value_get(f"m-ok/{name}/{i}", _BARRIER_MS) or None
                for i in range(self.processes)]


class _WriterTimers:
    """Time spent in each stage of fastbackup's writer thread, per save.

    Wraps (in this worker only) the functions the writer calls, so that the
    time from a save to durable can be split: encoding, this process's part
    (or, in one process, the checkpoint) written durably, process 0 waiting
    for every part, the manifest's commit, the others waiting for it, and
    pruning the previous checkpoint.
    """

    STAGES = (
        ("encode", "fastbackup.format", None, "encode"),
        ("write_part", "fastbackup.stores.local", "LocalStore", "write_part"),
        ("commit", "fastbackup.stores.local", "LocalStore", "commit"),
        ("gather_parts", "fastbackup.coordination", "Coordinator", "gather"),
        ("wait_commit", "fastbackup.coordination", "Coordinator", "wait"),
        ("prune", "fastbackup.stores.parts", "ProcessParts", "prune"),
        ("prune", "fastbackup.stores.local", "LocalStore", "prune"),
    )

    def __init__(self) -> None:
        import importlib
        import threading

        self._lock = threading.Lock()
        self._total: dict[str, float] = {}
        self._depth = threading.local()
        for key, module, cls, attr in self.STAGES:
            owner: Any = importlib.import_module(module)
            if cls is not None:
                owner = getattr(owner, cls)
            setattr(owner, attr, self._wrap(key, getattr(owner, attr)))

    def _wrap(self, key: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            # ProcessParts.prune calls LocalStore.prune: counted once.
            outer = not getattr(self._depth, key, 0)
            setattr(self._depth, key, getattr(self._depth, key, 0) + 1)
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                setattr(self._depth, key, getattr(self._depth, key) - 1)
                if outer:
                    with self._lock:
                        self._total[key] = (self._total.get(key, 0.0)
                                            + time.perf_counter() - start)
        return timed

    def totals(self) -> dict[str, float]:
        with self._lock:
            return dict(self._total)


def _distribution() -> Any:
    import jax
    from keras import distribution

    mesh = distribution.DeviceMesh((1, 4), ["batch", "model"], jax.devices())
    layout = distribution.LayoutMap(mesh)
    layout[".*hidden.*kernel"] = (None, "model")
    layout[".*hidden.*bias"] = ("model",)
    dist = distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")
    # With several processes Keras refuses numpy input otherwise; the batch
    # axis has size 1, so every process feeds the same batch.
    dist.auto_shard_dataset = False
    return dist


def _build(spec: Any, seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    layers: list[Any] = [keras.layers.Input((spec.input_dim,))]
    layers += [keras.layers.Dense(spec.units, activation="relu", name=f"hidden_{i}")
               for i in range(spec.hidden_layers)]
    layers.append(keras.layers.Dense(1, name="head"))
    # Fixed names: Keras's Orbax restore matches variables by path
    # (`mlp/hidden_0/kernel`, `adam/iteration`) and silently skips those
    # that differ, as a second model of one process would otherwise have
    # (`sequential_1/...`, `adam_1/...`).
    model = keras.Sequential(layers, name="mlp")
    model.compile(optimizer=keras.optimizers.Adam(1e-4, name="adam"), loss="mse")
    return model


def _local_shards(model: Any) -> list[bytes]:
    """This process's shards of every variable a backup covers, as bytes."""
    import numpy as np

    from fastbackup.snapshot import collect_variables

    out = []
    for _, v in collect_variables(model):
        # `addressable_data`, not `addressable_shards`, which raises for a
        # replicated array placed while each process has one device.
        value = v.value
        for i in range(len(value.sharding.addressable_devices)):
            out.append(np.asarray(value.addressable_data(i)).tobytes())
    return out


def _owned_bytes(model: Any) -> int:
    """Bytes of the regions this process writes (each distinct region once
    in the job: `Backend.written_regions`)."""
    import jax
    import numpy as np

    from fastbackup import backend
    from fastbackup.snapshot import collect_variables

    framework = backend.current()
    total = 0
    for _, v in collect_variables(model):
        itemsize = np.dtype(v.value.dtype).itemsize
        regions = framework.written_regions(v)
        if regions is None:
            # A fully addressable array: process 0 writes it whole.
            if jax.process_index() == 0:
                total += int(np.prod(v.shape)) * itemsize
            continue
        total += sum(int(np.prod(size)) * itemsize for _, size in regions)
    return total


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]


def run_worker(spec: Any, processes: int, index: int, work_dir: str, rounds: int,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Measures one process of one layout (see the module docstring)."""
    import jax
    from keras import distribution

    import fastbackup
    from benchmarks.measurements import (
        median, orbax_available, round_order, settle, timed_orbax)
    from benchmarks.models import make_data, state_nbytes
    from fastbackup.restore import restore_latest

    job = _Job(processes, index)
    distribution.set_distribution(_distribution())
    model = _build(spec, seed=0)
    x, y = make_data(spec, steps=2, seed=1)
    # Two steps: the optimizer's moments hold dense values, as in training.
    model.fit(x, y, batch_size=spec.batch_size, epochs=1, shuffle=False, verbose=0)
    fb_dir = os.path.join(work_dir, "fastbackup")
    orbax_dir = os.path.join(work_dir, "orbax")
    out: dict[str, Any] = {
        "process": index, "processes": processes,
        "devices": len(jax.local_devices()), "global_devices": len(jax.devices()),
        "state_bytes": state_nbytes(model), "owned_bytes": _owned_bytes(model),
        "kernel_fully_addressable": bool(
            model.get_layer("hidden_0").kernel.value.is_fully_addressable),
        "kernel_spec": str(model.get_layer("hidden_0").kernel.value.sharding.spec),
        "errors": {},
    }
    samples: dict[str, list[float]] = {
        k: [] for k in ("fastbackup_blocking_s", "fastbackup_durable_s",
                        "fastbackup_write_s", "fastbackup_bytes",
                        "fastbackup_io_bytes", "orbax_blocking_s",
                        "orbax_durable_s", "orbax_io_bytes",
                        "fastbackup_restore_s", "orbax_restore_s")
    }

    timers = _WriterTimers()
    stages: dict[str, list[float]] = {}
    cb = fastbackup.BackupAndRestore(fb_dir, delete_checkpoint=False)
    cb.set_model(model)
    cb.on_train_begin()
    saves = [0]

    def fastbackup_save(record: bool) -> None:
        before, io = cb.stats.bytes_written, _io_write_bytes()
        spent = timers.totals()
        start = time.perf_counter()
        saves[0] += 1
        cb._save(1, saves[0], block=True)
        cb.wait_until_finished()
        durable = time.perf_counter() - start
        if record:
            for key, total in timers.totals().items():
                stages.setdefault(key, []).append(total - spent.get(key, 0.0))
            samples["fastbackup_blocking_s"].append(cb.blocking_seconds[-1])
            samples["fastbackup_durable_s"].append(durable)
            samples["fastbackup_write_s"].append(cb.stats.write_seconds[-1])
            samples["fastbackup_bytes"].append(cb.stats.bytes_written - before)
            samples["fastbackup_io_bytes"].append(_io_write_bytes() - io)

    ocb: Any = None
    orbax_steps = [0]

    def orbax_save(record: bool) -> None:
        io = _io_write_bytes()
        start = time.perf_counter()
        orbax_steps[0] += 1
        ocb._save_checkpoint(orbax_steps[0])
        blocking = ocb.blocking_seconds[-1]
        ocb.wait_until_finished()
        if record:
            samples["orbax_blocking_s"].append(blocking)
            samples["orbax_durable_s"].append(time.perf_counter() - start)
            samples["orbax_io_bytes"].append(_io_write_bytes() - io)

    # Untimed first saves: buffers, Orbax's threads and handlers. Orbax is
    # tried first and dropped in every process if it fails in any.
    error = None
    if not orbax_available():
        error = "orbax-checkpoint not installed"
    else:
        try:
            ocb = timed_orbax(orbax_dir, save_freq="epoch")
            ocb.set_model(model)
            orbax_save(record=False)
        except Exception as e:  # noqa: BLE001 - recorded, reported in the table
            error = _error_text(e)
    errors = job.all_ok("orbax-save", error)
    with_orbax = not any(errors)
    if not with_orbax:
        out["errors"]["orbax_save"] = [e for e in errors if e][0]
        log(f"  m: process {index}: Orbax not measured: {out['errors']['orbax_save']}")
    fastbackup_save(record=False)
    out["first_fastbackup_blocking_s"] = cb.blocking_seconds[-1]

    steps: dict[str, Callable[[], None]] = {
        "fastbackup": lambda: fastbackup_save(record=True)}
    if with_orbax:
        steps["orbax"] = lambda: orbax_save(record=True)
    for r in range(rounds):
        for name in round_order(list(steps), r):
            settle(fb_dir, orbax_dir)
            job.barrier(f"save-{name}-{r}")
            steps[name]()
        if index == 0:
            log(f"  m: save round {r + 1}/{rounds} done")
    cb.on_train_end()
    # Closing syncs the processes: only where every process has a callback.
    if with_orbax:
        try:
            ocb.on_train_end()
        except Exception as e:  # noqa: BLE001 - recorded
            out["errors"]["orbax_close"] = _error_text(e)
    job.barrier("saved")

    # Restores, into fresh models of the same layout (optimizer built).
    expected = _local_shards(model)
    targets = {}
    for name in steps:
        target = _build(spec, seed=1)
        target.optimizer.build(target.trainable_variables)
        targets[name] = target

    def fastbackup_restore() -> float:
        start = time.perf_counter()
        if restore_latest(fb_dir, targets["fastbackup"], fall_back=False) is None:
            raise RuntimeError(f"no fastbackup checkpoint in {fb_dir}")
        return time.perf_counter() - start

    def orbax_restore() -> float:
        start = time.perf_counter()
        targets["orbax"].load_weights(orbax_dir)
        return time.perf_counter() - start

    restores = {name: {"fastbackup": fastbackup_restore,
                       "orbax": orbax_restore}[name] for name in steps}
    exact: dict[str, Any] = {}
    for name in steps:
        error = None
        try:
            settle(fb_dir, orbax_dir)
            job.barrier(f"first-restore-{name}")
            out[f"first_{name}_restore_s"] = restores[name]()
            exact[name] = _local_shards(targets[name]) == expected
        except Exception as e:  # noqa: BLE001 - recorded
            error = _error_text(e)
        errors = job.all_ok(f"restore-{name}", error)
        if any(errors):
            out["errors"][f"{name}_restore"] = [e for e in errors if e][0]
            restores.pop(name)
    out["restore_exact"] = exact
    for r in range(rounds):
        for name in round_order(list(restores), r):
            settle(fb_dir, orbax_dir)
            job.barrier(f"restore-{name}-{r}")
            samples[f"{name}_restore_s"].append(restores[name]())
        if index == 0:
            log(f"  m: restore round {r + 1}/{rounds} done")
    out["samples"] = samples
    out["median"] = {k: median(v) for k, v in samples.items()}
    out["fastbackup_stages"] = {"samples": stages,
                                "median": {k: median(v) for k, v in stages.items()}}
    out["orbax"] = "measured" if with_orbax else out["errors"].get("orbax_save")
    job.barrier("measured")
    return out


def _worker_main(args: argparse.Namespace) -> int:
    # Before JAX is imported: the devices and the backend are fixed then.
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_NUM_CPU_DEVICES"] = str(args.devices)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    if args.processes > 1:
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}", num_processes=args.processes,
            process_id=args.process_id, initialization_timeout=60)
    result = run_worker(model_spec(args.quick), args.processes, args.process_id,
                        args.dir, args.rounds, log=lambda m: print(m, flush=True))
    print("RESULT " + json.dumps(result), flush=True)
    if args.processes > 1:
        # Process 0 hosts the coordination service: a process whose client
        # still runs when the service goes aborts (-6, seen after a barrier
        # and `os._exit` in every process, under load). `shutdown`
        # disconnects every client before the service stops.
        jax.distributed.shutdown()
    # Skips Orbax's atexit handlers.
    os._exit(0)


# ---------------------------------------------------------------------------
# Harness side.


def run_layout(layout: str, quick: bool, rounds: int, work_dir: str,
               log: Callable[[str], None], timeout_s: float) -> list[dict[str, Any]]:
    """Runs one layout's processes side by side; returns each one's result.

    Raises:
        RuntimeError: a process failed, printed no result, or the layout
            took longer than `timeout_s` (every process is then killed).
    """
    processes, devices = LAYOUTS[layout]
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTBACKUP_")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    procs = []
    for i in range(processes):
        cmd = [sys.executable, "-m", "benchmarks.sharded", "--worker",
               "--processes", str(processes), "--devices", str(devices),
               "--process-id", str(i), "--port", str(port), "--dir", work_dir,
               "--rounds", str(rounds)] + (["--quick"] if quick else [])
        # Files, not pipes: a pipe read only at the end would fill up.
        out, err = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
        procs.append((subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                       cwd=root, env=env), out, err))
    deadline = time.monotonic() + timeout_s
    results: list[dict[str, Any]] = []
    failure = None
    try:
        for i, (proc, out, err) in enumerate(procs):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                failure = failure or f"layout {layout}: process {i} timed out after {timeout_s:.0f} s"
                continue
            out.seek(0)
            lines = out.read().splitlines()
            for line in lines:
                if not line.startswith("RESULT "):
                    log(line)
            found = [json.loads(ln[len("RESULT "):]) for ln in lines if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                err.seek(0)
                tail = "\n".join(err.read().strip().splitlines()[-12:])
                failure = failure or (f"layout {layout}: process {i} exited "
                                      f"{proc.returncode}:\n{tail}")
                continue
            results.append(found[-1])
    finally:
        for proc, out, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            out.close()
            err.close()
    if failure:
        raise RuntimeError(failure)
    return results


def _disk_usage(layout_dir: str, processes: int) -> dict[str, Any]:
    """Bytes on disk of each tool's latest backup, by the process writing them."""
    fb = os.path.join(layout_dir, "fastbackup")
    parts = [0] * processes
    manifest = other = 0
    for name in os.listdir(fb) if os.path.isdir(fb) else []:
        size = os.path.getsize(os.path.join(fb, name))
        if ".part-" in name:
            parts[int(name.split(".part-")[1].split("-of-")[0])] += size
        elif name.startswith("ckpt-"):
            manifest += size
        else:
            other += size
    orbax: dict[str, int] = {}
    od = os.path.join(layout_dir, "orbax")
    for folder, _, names in os.walk(od):
        rel = os.path.relpath(folder, od)
        # Orbax's OCDBT files: one folder per process ("ocdbt.process_<i>").
        owner = next((p for p in rel.split(os.sep) if p.startswith("ocdbt.process_")), "common")
        for name in names:
            orbax[owner] = orbax.get(owner, 0) + os.path.getsize(os.path.join(folder, name))
    return {"fastbackup": {"parts": parts, "manifest": manifest, "other": other},
            "orbax": orbax}


def _row(tool: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One (tool, layout): the per-process medians, in process order."""
    keys = {
        "fastbackup": ("blocking_s", "durable_s", "write_s", "bytes", "io_bytes",
                       "restore_s"),
        "orbax": ("blocking_s", "durable_s", "io_bytes", "restore_s"),
    }[tool]
    row = {k: [r["median"].get(f"{tool}_{k}") for r in results] for k in keys}
    # Time to durable can be bimodal (see fastbackup's stages): the fastest
    # save of each process beside the median.
    row["durable_min_s"] = [min(r["samples"][f"{tool}_durable_s"], default=None)
                            for r in results]
    return row


def measure(quick: bool, rounds: int, work_dir: str,
            log: Callable[[str], None] = print, timeout_s: float | None = None
            ) -> dict[str, Any]:
    """Runs both layouts and returns the section's figures.

    A layout that fails is recorded as `{"error": ...}` rather than raised,
    so that the other layout's figures are kept.
    """
    spec = model_spec(quick)
    timeout_s = timeout_s or (240.0 if quick else 480.0)
    out: dict[str, Any] = {
        "model": {"units": spec.units, "input_dim": spec.input_dim,
                  "hidden_layers": spec.hidden_layers, "batch_size": spec.batch_size,
                  "parameters": spec.parameters},
        "mesh": "(batch=1, model=4); hidden kernels (None, 'model'), biases ('model',); "
                "head replicated",
        "rounds": rounds,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "layouts": {},
    }
    for layout in LAYOUTS:
        processes, devices = LAYOUTS[layout]
        layout_dir = os.path.join(work_dir, f"sharded-{layout}")
        shutil.rmtree(layout_dir, ignore_errors=True)
        os.makedirs(layout_dir)
        log(f"m: {processes} process(es) x {devices} CPU devices, {rounds} rounds")
        t0 = time.perf_counter()
        try:
            results = run_layout(layout, quick, rounds, layout_dir, log, timeout_s)
        except RuntimeError as e:
            out["layouts"][layout] = {"error": str(e)}
            log(f"m: {e}")
            continue
        finally:
            seconds = time.perf_counter() - t0
        results.sort(key=lambda r: r["process"])
        first = results[0]
        entry: dict[str, Any] = {
            "processes": processes, "devices_per_process": devices,
            "seconds": seconds,
            "state_bytes": first["state_bytes"],
            "owned_bytes": [r["owned_bytes"] for r in results],
            "kernel_spec": first["kernel_spec"],
            "kernel_fully_addressable": first["kernel_fully_addressable"],
            "orbax": first["orbax"],
            "errors": {k: v for r in results for k, v in r["errors"].items()},
            "restore_exact": [r["restore_exact"] for r in results],
            "disk": _disk_usage(layout_dir, processes),
            "fastbackup": _row("fastbackup", results),
            "fastbackup_stages": [r["fastbackup_stages"]["median"] for r in results],
            "per_process": results,
        }
        if first["orbax"] == "measured":
            entry["orbax_figures"] = _row("orbax", results)
        out["layouts"][layout] = entry
        shutil.rmtree(layout_dir, ignore_errors=True)
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["ratios"] = ratios(out)
    return out


def ratios(m: dict[str, Any]) -> dict[str, Any]:
    """2 processes over 1 process, per tool: the largest process of each.

    The slowest (or busiest) process is the one the job waits for.
    """
    one, two = m["layouts"].get("1x4", {}), m["layouts"].get("2x2", {})
    out: dict[str, Any] = {}
    for tool, key in (("fastbackup", "fastbackup"), ("orbax", "orbax_figures")):
        a, b = one.get(key), two.get(key)
        if not a or not b:
            continue
        for fig in ("bytes", "io_bytes", "blocking_s", "durable_s", "restore_s"):
            x, y = a.get(fig), b.get(fig)
            if x and y and None not in x and None not in y and max(x):
                out[f"{tool}_{fig}"] = max(y) / max(x)
    return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.sharded",
        description="A sharded model in 1 process and in 2: fastbackup and "
                    "Orbax (section m).")
    parser.add_argument("--quick", action="store_true",
                        help="the ~38 MB model (default: ~151 MB)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None,
                        help="parent of the backups (default: a temporary "
                             "folder on the current directory's disk)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.worker:
        return _worker_main(args)
    from benchmarks import machine
    from benchmarks.report import sharded_table

    work_dir = machine.make_work_dir(args.dir)
    try:
        result = measure(args.quick, args.rounds, work_dir,
                         log=lambda m: print(m, flush=True))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(sharded_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
