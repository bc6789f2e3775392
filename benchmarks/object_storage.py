"""Section s: backups in an object store (moto's S3 server on 127.0.0.1).

Against one local moto server process, in interleaved rounds:

* upload: `ObjectStore.commit` of the model's state (encode, CRC-32C of
  every segment, multipart upload from the snapshot's buffers, commit
  record) vs obstore's own `put` of the same bytes from one buffer, with
  the same part size and concurrency;
* restore: `restore_latest` from the bucket (commit record, header, the
  tensors' parallel ranged GETs with their checksums verified as they land,
  assignment) vs the raw parallel ranged GETs
  of the same object into memory;
* the training loop at `save_freq=5`: no callback, fastbackup to a local
  directory, fastbackup to the bucket.

The server shares the machine's cores with training, and moto is costly
(about 10 CPU seconds per GB received, measured here): on two cores that
time is taken from the training loop, which a remote bucket's server never
does, so the CPU time the server used during each training loop is recorded
beside the loop's time. (Running it at niceness 19 was tried: on a shared
machine it was then starved by other tenants and every transfer time
varied fivefold between rounds.)
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import keras

from benchmarks.measurements import LoopTiming, median, round_order, settle
from benchmarks.models import (
    ModelSpec,
    fit_inputs,
    fresh_restore_target,
    make_data,
)


# A copy of a checkpoint's bytes for the raw client runs (the checkpoint
# objects themselves are pruned as the rounds upload new ones).
RAW_KEY = "bench/raw/object"


def _server() -> Any:
    # The test suite's helper: the same moto process the tests start.
    from tests.object_servers import MotoServer, s3_environ

    server = MotoServer().start()
    os.environ.update(s3_environ(server.endpoint))
    return server


def _cpu_of(pid: int) -> Callable[[], float]:
    import psutil

    process = psutil.Process(pid)

    def cpu() -> float:
        t = process.cpu_times()
        return t.user + t.system

    return cpu


def measure(
    model: keras.Model,
    spec: ModelSpec,
    work_dir: str,
    rounds: int,
    loop_rounds: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Runs section s and returns its samples and medians."""
    import obstore

    import fastbackup
    from fastbackup import format as fmt
    from fastbackup.stores import object_store
    from fastbackup.stores.location import open_store
    from fastbackup.restore import restore_latest
    from fastbackup.snapshot import HostSnapshot, Snapshotter

    server = _server()
    try:
        url = f"s3://{server.create_bucket()}/bench/run"
        store = open_store(url)
        client = store.client
        snapshotter = Snapshotter(model)
        snapshot = snapshotter.take(HostSnapshot.allocate(snapshotter.layout()), 0, 0)
        policy = fmt.CompressionPolicy(1)
        samples: dict[str, list[float]] = {
            "fastbackup_upload_s": [], "raw_put_s": [],
            "fastbackup_restore_s": [], "fastbackup_download_s": [],
            "raw_get_s": [],
        }
        step = [0]

        def fastbackup_upload() -> None:
            # What the writer thread does for one checkpoint up to its
            # commit point (encode, CRC-32C, upload, commit record); the
            # deletion of the previous one follows, untimed.
            start = time.perf_counter()
            encoded = fmt.encode(snapshot, policy, step[0])
            store.commit(step[0], encoded, sync=True)
            samples["fastbackup_upload_s"].append(time.perf_counter() - start)
            store.prune(1)
            step[0] += 1

        fastbackup_upload()  # warm-up; also the object the raw runs copy
        del samples["fastbackup_upload_s"][:]
        [(_, ckpt_url)] = store.list_checkpoints()
        key = store._key(ckpt_url.rsplit("/", 1)[1])  # noqa: SLF001
        data = memoryview(bytes(obstore.get(client, key).bytes()))
        size = len(data)

        def raw_put() -> None:
            start = time.perf_counter()
            obstore.put(client, RAW_KEY, data,
                        chunk_size=object_store.PART_BYTES,
                        max_concurrency=object_store.CONCURRENCY)
            samples["raw_put_s"].append(time.perf_counter() - start)

        raw_put()  # warm-up; also the object the raw gets read
        del samples["raw_put_s"][:]
        target = fresh_restore_target(spec)

        def fastbackup_restore() -> None:
            start = time.perf_counter()
            reader = restore_latest(store, target, fall_back=False)
            samples["fastbackup_restore_s"].append(time.perf_counter() - start)
            if reader is None:
                raise RuntimeError("nothing restored from the bucket")

        def fastbackup_download() -> None:
            # The download alone: open_checkpoint (prefix, footer and
            # header), then every tensor's ranged GETs, checksums verified
            # as they land; no assignment.
            [(_, u)] = store.list_checkpoints()
            start = time.perf_counter()
            with store.open_checkpoint(u) as reader:
                reader.fetch(reader.entries)
            samples["fastbackup_download_s"].append(time.perf_counter() - start)

        def raw_get() -> None:
            out = bytearray(size)
            view = memoryview(out)
            part = object_store.PART_BYTES

            def fetch(offset: int) -> None:
                n = min(part, size - offset)
                view[offset:offset + n] = memoryview(
                    obstore.get_range(client, RAW_KEY, start=offset, length=n))

            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(object_store.CONCURRENCY) as pool:
                list(pool.map(fetch, range(0, size, part)))
            samples["raw_get_s"].append(time.perf_counter() - start)

        steps = {"fastbackup_upload": fastbackup_upload, "raw_put": raw_put,
                 "fastbackup_restore": fastbackup_restore,
                 "fastbackup_download": fastbackup_download, "raw_get": raw_get}
        for r in range(rounds):
            order = round_order(list(steps), r)
            log(f"  round {r + 1}/{rounds}: {', '.join(order)}")
            for name in order:
                gc.collect()
                steps[name]()
        # The restore stays exact through the bucket.
        exact = all(
            a.tobytes() == b.tobytes()
            for a, b in zip(_values(model), _values(target))
        )
        del target, snapshot, data
        gc.collect()

        loop = _measure_loop(model, spec, work_dir, url, loop_rounds, log,
                             fastbackup, _cpu_of(server.pid))
    finally:
        server.stop()
    m = {k: median(v) for k, v in samples.items()}
    return {
        "object_bytes": size,
        "part_bytes": object_store.PART_BYTES,
        "concurrency": object_store.CONCURRENCY,
        "samples": samples,
        "median": m,
        "restore_exact": exact,
        "upload_vs_raw": _ratio(m["raw_put_s"], m["fastbackup_upload_s"]),
        "restore_vs_raw": _ratio(m["raw_get_s"], m["fastbackup_restore_s"]),
        # Median of each round's own ratio: robust to the load of other
        # tenants drifting between rounds.
        "upload_vs_raw_paired": _paired(samples["raw_put_s"],
                                        samples["fastbackup_upload_s"]),
        "restore_vs_raw_paired": _paired(samples["raw_get_s"],
                                         samples["fastbackup_restore_s"]),
        "loop": loop,
    }


def _values(model: keras.Model) -> list[Any]:
    from fastbackup.snapshot import collect_variables

    import numpy as np

    return [np.array(v.numpy()) for name, v in collect_variables(model)
            if not name.startswith("metrics.")]


def _paired(raw: list[float], ours: list[float]) -> float | None:
    ratios = [r / o for r, o in zip(raw, ours) if o]
    return statistics.median(ratios) if ratios else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _measure_loop(
    model: keras.Model,
    spec: ModelSpec,
    work_dir: str,
    url: str,
    rounds: int,
    log: Callable[[str], None],
    fastbackup: Any,
    server_cpu: Callable[[], float],
) -> dict[str, Any]:
    x, y = make_data(spec, steps=spec.steps_per_epoch, seed=2)
    inputs = fit_inputs(spec, x, y)
    warm = 3 * spec.batch_size
    model.fit(x[:warm], y[:warm], batch_size=spec.batch_size, epochs=1,
              shuffle=False, verbose=0)
    local_dir = os.path.join(work_dir, "loop-object-local")
    callbacks = {
        "none": None,
        "local/5": fastbackup.BackupAndRestore(local_dir, save_freq=5),
        "s3/5": fastbackup.BackupAndRestore(url + "-loop", save_freq=5),
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in callbacks}
    settle()
    for r in range(rounds):
        order = round_order(list(callbacks), r)
        log(f"  loop round {r + 1}/{rounds}: {', '.join(order)}")
        for key in order:
            callback = callbacks[key]
            timing = LoopTiming()
            server_before = server_cpu()
            model.fit(**inputs, epochs=spec.loop_epochs, verbose=0,
                      callbacks=[timing.start]
                      + ([callback] if callback else []) + [timing.stop])
            run = {"loop_s": timing.loop_s, "steps_s": timing.steps_s,
                   "end_s": timing.end_s, "cpu_s": timing.cpu_s,
                   "server_cpu_s": server_cpu() - server_before}
            if callback is not None:
                run["saves"] = callback.stats.saves
            runs[key].append(run)
            log(f"    {key:<8} loop {timing.loop_s:6.2f} s  (steps "
                f"{timing.steps_s:5.2f} s, end {timing.end_s:5.2f} s; server "
                f"CPU {run['server_cpu_s']:.2f} s)")
            shutil.rmtree(local_dir, ignore_errors=True)
            settle()
    for callback in callbacks.values():
        if callback is not None and callback._writer is not None:  # noqa: SLF001
            callback._writer.close()  # noqa: SLF001
    none = statistics.median(r["loop_s"] for r in runs["none"])
    summary = {}
    for key, items in runs.items():
        loop_s = statistics.median(r["loop_s"] for r in items)
        summary[key] = {
            "median_loop_s": loop_s, "overhead": loop_s / none - 1.0,
            "median_steps_s": statistics.median(r["steps_s"] for r in items),
            "median_end_s": statistics.median(r["end_s"] for r in items),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in items),
            "median_server_cpu_s": statistics.median(
                r["server_cpu_s"] for r in items),
        }
    local, remote = summary["local/5"]["overhead"], summary["s3/5"]["overhead"]
    return {
        "steps": spec.loop_steps,
        "runs": runs,
        "summary": summary,
        "overhead_vs_local": remote / local if local > 0 else None,
        "loop_vs_local": summary["s3/5"]["median_loop_s"]
        / summary["local/5"]["median_loop_s"],
    }
