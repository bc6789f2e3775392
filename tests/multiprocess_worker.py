"""Subprocess side of tests/test_sharding.py: one process of a JAX job.

    python tests/multiprocess_worker.py SCENARIO WORKDIR PROCESS_ID PORT
    python tests/multiprocess_worker.py layout WORKDIR PROCESS_ID PORT \
        PROCESSES DEVICES [SOURCE_WORKDIR]

Two processes x 2 CPU devices on 127.0.0.1 (`layout`: PROCESSES x DEVICES),
joined by `jax.distributed.initialize` (not with one process), train a small
model with `keras.distribution`
(`model`: a (1, 4) mesh whose Dense kernels are sharded on the model axis,
which crosses the processes; `data`: `DataParallel` over the 4 devices, each
process feeding its half of each batch). Scenarios:

- `model`: interrupted mid-epoch, resumed bitwise; then the backup restored
  onto a (2, 2) mesh and onto `DataParallel`; a failing part write (warned);
  a second job refused by the lock.
- `data`: SIGTERM to process 1 only; both stop at the same step, resume
  bitwise. WORKDIR may be an `s3://` URL: the backup is then there.
- `kill`: process 1 is killed with SIGKILL in the middle of writing its part
  of the fourth checkpoint.
- `after-kill`: the next run of the `kill` job restores the last committed
  checkpoint, which must equal the uninterrupted run's state at its step.
- `from-whole`: a single-process backup (whole tensors, made by the test)
  restores onto the (1, 4) mesh of the two processes.
- `single`: (PROCESS_ID and PORT ignored) one process with 4 devices, then
  one device, restore the `model` scenario's backup.
- `ranged`: WORKDIR is a bucket URL; argv 5 and 6 are the variable and
  the endpoint of a proxy this process's restore goes through. A model
  with a 4 MiB kernel sharded across the processes is backed up, then
  restored in a new `fit`: what each process reads is counted by its proxy.
- `crash-train`, `crash-resume`: (1 device per process) WORKDIR is a
  bucket URL or a directory. `crash-train` trains into it, printing each
  batch's state digest, until the test kills it with `kill -9`;
  `crash-resume` is the same job restarted at once: it reports the newest
  checkpoint it found, the one it restored, the restored state's digest,
  and what its ended `fit` left under WORKDIR.
- `layout`: in one process layout, `ModelParallel` on a (1, all devices)
  mesh and `DataParallel`, each interrupted mid-epoch and resumed bitwise;
  then, given SOURCE_WORKDIR (another layout's `layout` run), that run's
  two backups restored onto both distributions of this layout.

Prints one JSON line prefixed "RESULT ".
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import sys

SCENARIO = sys.argv[1]
if SCENARIO == "layout":
    PROCESSES, DEVICES = int(sys.argv[5]), int(sys.argv[6])
elif SCENARIO in ("crash-train", "crash-resume"):
    # One device per process: the layout of one process per GPU.
    PROCESSES, DEVICES = 2, 1
else:
    PROCESSES, DEVICES = (1, 4) if SCENARIO == "single" else (2, 2)
os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_NUM_CPU_DEVICES"] = str(DEVICES)
os.environ["FASTBACKUP_PEER_TIMEOUT_SECONDS"] = "30"
if SCENARIO == "layout":
    # Every due save is taken, in one process too (where a busy writer
    # would otherwise coalesce it): the resumed position is exact.
    os.environ["FASTBACKUP_ON_BUSY"] = "wait"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

EPOCHS = 3
BATCH = 16


def distribution_for(kind: str, shape: tuple[int, int] | None = None):
    """`DataParallel` over every device, or `ModelParallel` on a mesh of
    `shape` (by default (1, every device)) with the Dense kernels and biases
    sharded on its model axis."""
    from keras import distribution

    shape = shape or (1, len(jax.devices()))
    if kind == "data":
        dist = distribution.DataParallel(devices=jax.devices())
    else:
        mesh = distribution.DeviceMesh(shape, ["batch", "model"], jax.devices())
        layout = distribution.LayoutMap(mesh)
        layout[".*dense.*kernel"] = (None, "model")
        layout[".*dense.*bias"] = ("model",)
        dist = distribution.ModelParallel(layout_map=layout,
                                          batch_dim_name="batch")
    dist.auto_shard_dataset = False
    return dist


def make_model():
    from tests.conftest import dense_model

    return dense_model()


def data(kind: str, rows: int = 128):
    """This process's input: its share of each batch under DataParallel."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 8)).astype("float32")
    y = x[:, :4] * 2
    count = jax.process_count()
    if kind == "data" and count > 1:
        # Each global batch of 16 rows: 16 / count from each process.
        i = jax.process_index()
        mine = np.arange(rows).reshape(-1, count, BATCH // count)[:, i]
        return x[mine.reshape(-1)], y[mine.reshape(-1)]
    return x, y


def fit_args(kind: str, epochs: int = EPOCHS) -> dict:
    count = jax.process_count()
    per_process = BATCH // count if kind == "data" else BATCH
    return dict(epochs=epochs, batch_size=per_process, shuffle=False, verbose=0)


def local_state(model, metrics: bool = False) -> list[bytes]:
    """This process's shards of every variable, as bytes."""
    import numpy as np

    from fastbackup.snapshot import collect_variables

    out = []
    for name, v in collect_variables(model):
        if name.startswith("metrics.") and not metrics:
            continue
        # `addressable_data`, not `addressable_shards`: the latter raises
        # for a replicated array Keras placed while each process has one
        # device (until a train step replaces it).
        value = v.value
        for i in range(len(value.sharding.addressable_devices)):
            out.append(np.asarray(value.addressable_data(i)).tobytes())
    return out


def digest(model) -> str:
    return hashlib.sha256(b"".join(local_state(model))).hexdigest()


def global_state(model) -> list:
    """Every variable's global value (gathered over the processes)."""
    import numpy as np
    from jax.experimental import multihost_utils

    from fastbackup.snapshot import collect_variables

    out = []
    for _, v in collect_variables(model):
        value = v.value
        if value.is_fully_replicated:
            value = value.addressable_data(0)
        elif jax.process_count() > 1 and not value.is_fully_addressable:
            value = multihost_utils.process_allgather(value, tiled=True)
        out.append(np.asarray(value))
    return out


def spec(model) -> str:
    sharding = model.layers[0].kernel.value.sharding
    return str(getattr(sharding, "spec", type(sharding).__name__))


def digests_by_batch():
    """A callback recording the state's digest after every batch."""
    import keras

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.seen: dict[str, str] = {}

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            self.seen[f"{self.epoch},{batch}"] = digest(self.model)

    return Record()


def parts_of(backup: str) -> dict:
    """What the committed checkpoint's parts hold (read from the files); a
    whole checkpoint counts as one part of no name."""
    from fastbackup import format as fmt
    from fastbackup.stores.local import LocalStore

    store = LocalStore(backup)
    [(step, path)] = store.list_checkpoints()
    with fmt.CheckpointReader(path) as manifest:
        if not manifest.is_manifest:
            return {"step": step, "parts": [],
                    "raw_bytes": [sum(e.raw_size for e in manifest.entries)],
                    "files": sorted(os.listdir(backup))}
        names = [p["name"] for p in manifest.parts]
    raw = []
    for name in names:
        with store.open_part(name) as part:
            raw.append(sum(e.raw_size for e in part.entries))
    return {"step": step, "parts": names, "raw_bytes": raw,
            "files": sorted(os.listdir(backup))}


def scenario_model(workdir: str) -> dict:
    import numpy as np
    from keras import distribution

    import fastbackup
    from tests.conftest import InterruptAt, same_arrays

    backup = os.path.join(workdir, "backup")
    kind = "model"
    x, y = data(kind)
    fit = fit_args(kind)
    distribution.set_distribution(distribution_for(kind))
    reference = make_model()
    reference.fit(x, y, **fit)

    interrupted = make_model()
    try:
        interrupted.fit(x, y, **fit, callbacks=[
            fastbackup.BackupAndRestore(backup, save_freq=3),
            InterruptAt(1, 4)])
    except RuntimeError:
        pass
    resumed = make_model()
    cb = fastbackup.BackupAndRestore(backup, save_freq=3,
                                     resume_mid_epoch=True,
                                     delete_checkpoint=False)
    resumed.fit(x, y, **fit, callbacks=[cb])
    result: dict = {
        "processes": jax.process_count(),
        "sharded": not resumed.layers[0].kernel.value.is_fully_addressable,
        "restored_from": list(cb.restored_from),
        "resume_equals_uninterrupted": (
            local_state(resumed) == local_state(reference)),
        "bytes_written": cb.stats.bytes_written,
        "state_bytes": int(sum(
            np.prod(v.shape) * np.dtype(v.dtype).itemsize
            for v in resumed.variables + resumed.optimizer.variables
            + resumed.metrics_variables)),
        "backup": parts_of(backup),
    }
    expected = global_state(resumed)
    if jax.process_index() == 0:
        np.savez(os.path.join(workdir, "expected.npz"), *expected)

    # The backup onto other layouts of the same two processes. `fit` with
    # epochs=1, below the restored epoch, restores and trains nothing.
    for name, layout in (("model_parallel_2x2", distribution_for(kind, (2, 2))),
                         ("data_parallel", distribution_for("data"))):
        distribution.set_distribution(layout)
        target = make_model()
        target.build((None, 8))
        restore = fastbackup.BackupAndRestore(backup, save_freq=3,
                                              delete_checkpoint=False)
        target.fit(x, y, **{**fit, "epochs": 1}, callbacks=[restore])
        got = global_state(target)
        result[name] = {
            "equal": same_arrays(got, expected),
            "kernel_spec": spec(target),
        }
    distribution.set_distribution(distribution_for(kind))

    # A part write that fails in process 1 only: with FASTBACKUP_ON_ERROR=
    # warn both processes are told and train on; the checkpoint is not
    # committed, the one before it stays.
    result["failure"] = failing_part(workdir, x, y, fit)

    # A second job on a backup this one's lock holds: refused everywhere.
    locked = os.path.join(workdir, "locked")
    os.makedirs(locked, exist_ok=True)
    fd = None
    if jax.process_index() == 0:
        fd = os.open(os.path.join(locked, ".fastbackup.lock"),
                     os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        make_model().fit(x, y, **fit, callbacks=[
            fastbackup.BackupAndRestore(locked, save_freq=3)])
        result["locked"] = "not refused"
    except fastbackup.BackupDirLockedError as e:
        result["locked"] = str(e)
    finally:
        if fd is not None:
            os.close(fd)
    return result


def failing_part(workdir: str, x, y, fit) -> dict:
    import errno

    import fastbackup
    from fastbackup.stores import local
    from fastbackup.stores.local import LocalStore

    backup = os.path.join(workdir, "failing")
    real = local.write_file
    writes = [0]

    def write_file(directory, name, *args, **kwargs):
        writes[0] += 1
        if jax.process_index() == 1 and writes[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device (injected)",
                          os.path.join(directory, name))
        return real(directory, name, *args, **kwargs)

    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    handler = Keep()
    logging.getLogger("fastbackup").addHandler(handler)
    os.environ["FASTBACKUP_ON_ERROR"] = "warn"
    local.write_file = write_file
    try:
        cb = fastbackup.BackupAndRestore(backup, save_freq=1,
                                         delete_checkpoint=False)
        model = make_model()
        model.fit(x, y, **{**fit, "epochs": 1}, callbacks=[cb])
    finally:
        local.write_file = real
        del os.environ["FASTBACKUP_ON_ERROR"]
        logging.getLogger("fastbackup").removeHandler(handler)
    return {
        "warnings": [w for w in warnings if "checkpoint write failed" in w],
        "saves": cb.stats.saves,
        "last_durable": list(cb.stats.last_durable or ()),
        "committed": [s for s, _ in LocalStore(backup).list_checkpoints()],
    }


def scenario_data(workdir: str) -> dict:
    import keras
    from keras import distribution

    import fastbackup
    from fastbackup.stores.location import open_store

    # A bucket's URL (s3://...) is the backup itself.
    backup = workdir if "://" in workdir else os.path.join(workdir, "backup")
    kind = "data"
    x, y = data(kind)
    fit = fit_args(kind)
    distribution.set_distribution(distribution_for(kind))
    reference = make_model()
    reference.fit(x, y, **fit)

    class Preempt(keras.callbacks.Callback):
        """SIGTERM to process 1 only, after batch 2 of epoch 1."""

        def __init__(self):
            super().__init__()
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if jax.process_index() == 1 and (self.epoch, batch) == (1, 2):
                os.kill(os.getpid(), signal.SIGTERM)

    stopped = make_model()
    cb = fastbackup.BackupAndRestore(backup, save_freq=100,
                                     handle_sigterm=True)
    position = digests_by_batch()
    stopped.fit(x, y, **fit, callbacks=[Preempt(), cb, position])
    saved = cb.stats.last_durable
    resumed = make_model()
    again = fastbackup.BackupAndRestore(backup, save_freq=100,
                                        handle_sigterm=True,
                                        resume_mid_epoch=True)
    resumed.fit(x, y, **fit, callbacks=[again])
    return {
        "processes": jax.process_count(),
        "stop_training": bool(stopped.stop_training),
        "last_batch_trained": max(position.seen, key=lambda k: tuple(
            map(int, k.split(",")))),
        "saved": list(saved or ()),
        "restored_from": list(again.restored_from or ()),
        "resume_equals_uninterrupted": (
            local_state(resumed) == local_state(reference)),
        "backup_deleted": not open_store(backup).exists(),
    }


def scenario_kill(workdir: str) -> dict:
    from keras import distribution

    import fastbackup
    from fastbackup._compat import native
    from fastbackup.stores import local

    backup = os.path.join(workdir, "backup")
    kind = "model"
    x, y = data(kind)
    distribution.set_distribution(distribution_for(kind))
    real = local.write_file
    writes = [0]

    def write_file(directory, name, step, encoded, *args, **kwargs):
        writes[0] += 1
        if jax.process_index() == 1 and writes[0] == 4:
            # Half of this part is in its temporary file when the process
            # dies: no rename, no report to the others.
            f = native.AtomicFile(directory, name, sync=True)
            f.write(encoded.segments[: len(encoded.segments) // 2])
            print("KILLING", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(directory, name, step, encoded, *args, **kwargs)

    local.write_file = write_file
    cb = fastbackup.BackupAndRestore(backup, save_freq=1)
    try:
        make_model().fit(x, y, **fit_args(kind), callbacks=[cb])
    except Exception as e:  # the survivor: its peer is gone
        return {"fit": f"{type(e).__name__}: {str(e)[:300]}",
                "saves": cb.stats.saves}
    return {"fit": "completed", "saves": cb.stats.saves}


def scenario_after_kill(workdir: str) -> dict:
    import keras
    from keras import distribution

    import fastbackup
    from fastbackup.stores.local import LocalStore

    backup = os.path.join(workdir, "backup")
    kind = "model"
    x, y = data(kind)
    fit = fit_args(kind)
    distribution.set_distribution(distribution_for(kind))
    before = sorted(os.listdir(backup))
    committed = [s for s, _ in LocalStore(backup).list_checkpoints()]
    reference = make_model()
    record = digests_by_batch()
    reference.fit(x, y, **fit, callbacks=[record])

    class AfterRestore(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.digest = digest(self.model)
            self.files = sorted(os.listdir(backup))

    resumed = make_model()
    cb = fastbackup.BackupAndRestore(backup, save_freq=1, resume_mid_epoch=True)
    after = AfterRestore()
    resumed.fit(x, y, **fit, callbacks=[cb, after])
    step, epoch, batch = cb.restored_from
    return {
        "files_before": before,
        "committed_before": committed,
        "restored_from": [step, epoch, batch],
        "restored_equals_reference_at_its_step": (
            after.digest == record.seen[f"{epoch},{batch}"]),
        "files_after_restore": after.files,
        "resume_equals_uninterrupted": (
            local_state(resumed) == local_state(reference)),
    }


def scenario_from_whole(workdir: str) -> dict:
    """A single-process backup (whole tensors) onto the 2-process mesh."""
    import numpy as np
    from keras import distribution

    import fastbackup
    from tests.conftest import same_arrays

    with np.load(os.path.join(workdir, "whole-expected.npz")) as f:
        expected = [f[k] for k in sorted(f.files, key=lambda k: int(k[4:]))]
    distribution.set_distribution(distribution_for("model"))
    x, y = data("model")
    target = make_model()
    target.build((None, 8))
    cb = fastbackup.BackupAndRestore(os.path.join(workdir, "whole"),
                                     delete_checkpoint=False)
    target.fit(x, y, epochs=1, batch_size=BATCH, verbose=0, callbacks=[cb])
    got = global_state(target)
    return {
        "restored_from": list(cb.restored_from or ()),
        "sharded": not target.layers[0].kernel.value.is_fully_addressable,
        "equal": same_arrays(got, expected),
    }


def scenario_single(workdir: str) -> dict:
    import numpy as np
    from keras import distribution

    import fastbackup
    from tests.conftest import same_arrays

    backup = os.path.join(workdir, "backup")
    with np.load(os.path.join(workdir, "expected.npz")) as f:
        expected = [f[k] for k in sorted(f.files, key=lambda k: int(k[4:]))]
    x, y = data("model")
    result = {}
    for name, layout in (("model_parallel_4", distribution_for("model")),
                         ("single_device", None)):
        distribution.set_distribution(layout)
        target = make_model()
        target.build((None, 8))
        restore = fastbackup.BackupAndRestore(backup, save_freq=3,
                                              delete_checkpoint=False)
        target.fit(x, y, epochs=1, batch_size=BATCH, verbose=0,
                   callbacks=[restore])
        got = global_state(target)
        result[name] = {
            "equal": same_arrays(got, expected),
            "kernel_spec": spec(target),
            "devices": len(target.layers[0].kernel.value.devices()),
        }
    return result


def scenario_layout(workdir: str) -> dict:
    """Resume bitwise in this layout; restore another layout's backups."""
    source = sys.argv[7] if len(sys.argv) > 7 else None
    result: dict = {
        "processes": jax.process_count(),
        "local_devices": jax.local_device_count(),
    }
    for kind in ("model", "data"):
        result[kind] = resume_in_layout(kind, workdir)
    if source is not None:
        result["restored"] = restore_in_layout(source)
    return result


# The `layout` runs train 2 epochs of 4 batches: saves after every second
# batch, interrupted after batch 2 of epoch 1, so resumed after batch 1.
LAYOUT_ROWS, LAYOUT_EPOCHS = 64, 2


def layout_model():
    """`dense_model` with 8 outputs: every sharded dimension (16 and 8)
    splits over up to 8 devices."""
    from tests.conftest import dense_model

    return dense_model(outputs=8)


def layout_data(kind: str):
    """This process's input for `layout_model`: targets of 8 columns."""
    x, _ = data(kind, LAYOUT_ROWS)
    return x, x * 2


def resume_in_layout(kind: str, workdir: str) -> dict:
    import numpy as np
    from keras import distribution

    import fastbackup
    from tests.conftest import InterruptAt

    backup = os.path.join(workdir, f"backup-{kind}")
    x, y = layout_data(kind)
    fit = fit_args(kind, LAYOUT_EPOCHS)
    distribution.set_distribution(distribution_for(kind))
    reference = layout_model()
    reference.fit(x, y, **fit)
    uninterrupted = local_state(reference, metrics=True)
    # A fresh model: the snapshot reads arrays no train step has made.
    interrupted = layout_model()
    interrupted.build((None, 8))
    interrupted.optimizer.build(interrupted.trainable_variables)
    never_stepped = snapshot_is_exact(interrupted)
    try:
        interrupted.fit(x, y, **fit, callbacks=[
            fastbackup.BackupAndRestore(backup, save_freq=2),
            InterruptAt(1, 2)])
    except RuntimeError:
        pass
    # The reference model resumes (its train step is compiled already):
    # the restore must overwrite every variable of its final state.
    resumed = reference
    cb = fastbackup.BackupAndRestore(backup, save_freq=2,
                                     resume_mid_epoch=True,
                                     delete_checkpoint=False)
    resumed.fit(x, y, **fit, callbacks=[cb])
    kernel = resumed.layers[0].kernel.value
    expected = global_state(resumed)
    if jax.process_index() == 0:
        np.savez(os.path.join(workdir, f"expected-{kind}.npz"), *expected)
    return {
        "never_stepped_snapshot_exact": never_stepped,
        "regions_are_replica_0": regions_are_replica_0(resumed),
        "kernel_spec": spec(resumed),
        "kernel_devices": len(kernel.sharding.device_set),
        "restored_from": list(cb.restored_from or ()),
        "resume_equals_uninterrupted": (
            local_state(resumed, metrics=True) == uninterrupted),
        "state_bytes": int(sum(a.nbytes for a in expected)),
        "backup": parts_of(backup),
    }


def snapshot_is_exact(model) -> dict:
    """Whether every piece of a snapshot of `model` (this process's part)
    equals that region of the variable's global value, and how many."""
    from fastbackup.snapshot import Snapshotter, collect_variables

    names = [name for name, _ in collect_variables(model)]
    whole = dict(zip(names, global_state(model)))
    snap = Snapshotter(model).take(None, 0, 0)
    for spec_, array in zip(snap.specs, snap.arrays):
        value = whole[spec_.name.split(":")[0]]
        if spec_.start is not None:
            value = value[tuple(slice(a, a + n)
                                for a, n in zip(spec_.start, spec_.shape))]
        if array.dtype != value.dtype or array.tobytes() != value.tobytes():
            return {"exact": False, "pieces": len(snap.specs)}
    return {"exact": True, "pieces": len(snap.specs)}


def regions_are_replica_0(model) -> bool:
    """True if the regions this process writes of each variable are those
    of its shards that JAX numbers replica 0 (read where JAX can list the
    shards: arrays a train step made)."""
    from fastbackup import backend
    from fastbackup.snapshot import collect_variables

    framework = backend.current()
    for _, v in collect_variables(model):
        regions = framework.written_regions(v)
        if regions is None:
            continue
        shape = tuple(v.shape)
        shards = sorted((s for s in v.value.addressable_shards
                         if s.replica_id == 0), key=lambda s: s.device.id)
        if regions != [backend.region_of(s.index, shape) for s in shards]:
            return False
    return True


def restore_in_layout(source: str) -> dict:
    """Each backup of another layout's run, restored onto this layout's
    `ModelParallel` and `DataParallel`: every variable bitwise equal."""
    import numpy as np
    from keras import distribution

    import fastbackup
    from tests.conftest import same_arrays

    out = {}
    for saved in ("model", "data"):
        with np.load(os.path.join(source, f"expected-{saved}.npz")) as f:
            expected = [f[k] for k in sorted(f.files, key=lambda k: int(k[4:]))]
        for kind in ("model", "data"):
            distribution.set_distribution(distribution_for(kind))
            x, y = layout_data(kind)
            target = layout_model()
            target.build((None, 8))
            # `fit` for fewer epochs than the backup's restores, trains
            # nothing.
            restore = fastbackup.BackupAndRestore(
                os.path.join(source, f"backup-{saved}"),
                delete_checkpoint=False)
            target.fit(x, y, **fit_args(kind, 1), callbacks=[restore])
            out[f"{saved}->{kind}"] = {
                "restored_from": list(restore.restored_from or ()),
                "equal": same_arrays(global_state(target), expected),
                "kernel_spec": spec(target),
            }
    return out


def scenario_ranged(url: str) -> dict:
    """Backs up a model with a 4 MiB kernel sharded across the two
    processes into the bucket at `url`, then restores it in a new `fit`
    whose client goes through this process's own proxy
    (`argv[5]` names the variable, `argv[6]` the proxy's endpoint), so that
    the test counts what each process read."""
    import keras
    import numpy as np
    from keras import distribution

    import fastbackup
    from tests.conftest import same_arrays

    def big_model():
        keras.utils.set_random_seed(5)
        model = keras.Sequential([
            keras.layers.Input((512,)),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(8),
        ])
        model.compile(optimizer="adam", loss="mse")
        return model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 512)).astype("float32")
    y = x[:, :8] * 2
    fit = dict(batch_size=BATCH, shuffle=False, verbose=0)
    distribution.set_distribution(distribution_for("model"))
    trained = big_model()
    trained.fit(x, y, epochs=2, **fit, callbacks=[
        fastbackup.BackupAndRestore(url, delete_checkpoint=False)])
    saved = global_state(trained)

    os.environ[sys.argv[5]] = sys.argv[6]
    restored = big_model()
    cb = fastbackup.BackupAndRestore(url, delete_checkpoint=False)
    # epochs=1, below the restored epoch (2): restores, trains nothing.
    restored.fit(x, y, epochs=1, **fit, callbacks=[cb])
    return {
        "sharded": not restored.layers[0].kernel.value.is_fully_addressable,
        "restored_from": list(cb.restored_from),
        "restored_equals_saved": same_arrays(global_state(restored), saved),
    }


def scenario_crash_train(url: str) -> dict:
    """Trains into the bucket at `url`, saving after every batch, printing
    `state EPOCH BATCH DIGEST` after each batch (before the save of that
    batch, of the state it saves: a checkpoint committed before the kill
    has its line printed), until the test kills the job with `kill -9`."""
    import keras
    from keras import distribution

    import fastbackup

    x, y = data("data")
    distribution.set_distribution(distribution_for("data"))

    class Print(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            print("state", self.epoch, batch, digest(self.model), flush=True)

    make_model().fit(x, y, **fit_args("data", epochs=100), callbacks=[
        Print(),
        fastbackup.BackupAndRestore(url, save_freq=1, delete_checkpoint=False)])
    return {}


def scenario_crash_resume(url: str) -> dict:
    """The same job started again at once after the kill: how long `fit`
    took to restore, and the digest of the state it restored."""
    import time

    import keras
    from keras import distribution

    import fastbackup

    from fastbackup.stores.location import open_store

    x, y = data("data")
    distribution.set_distribution(distribution_for("data"))
    store = open_store(url)
    newest = store.list_checkpoints()
    seen: dict = {"newest_before": newest[0][0] if newest else None}

    class Probe(keras.callbacks.Callback):
        # After fastbackup's `on_train_begin`: the state restored.
        def on_train_begin(self, logs=None):
            seen["seconds"] = time.monotonic() - start
            seen["digest"] = digest(self.model)

    cb = fastbackup.BackupAndRestore(url, save_freq=1)
    start = time.monotonic()
    make_model().fit(x, y, **fit_args("data", epochs=2), callbacks=[cb, Probe()])
    # What the ended `fit` (delete_checkpoint=True) left under the location.
    from tests.object_servers import everything_under

    left = everything_under(url)
    return {**seen, "restored_from": list(cb.restored_from or []),
            "left": left}


def main() -> dict:
    workdir = sys.argv[2]
    if PROCESSES > 1:
        jax.distributed.initialize(
            f"127.0.0.1:{sys.argv[4]}", num_processes=PROCESSES,
            process_id=int(sys.argv[3]), initialization_timeout=60,
        )
    return {
        "model": scenario_model,
        "data": scenario_data,
        "kill": scenario_kill,
        "after-kill": scenario_after_kill,
        "from-whole": scenario_from_whole,
        "single": scenario_single,
        "layout": scenario_layout,
        "ranged": scenario_ranged,
        "crash-train": scenario_crash_train,
        "crash-resume": scenario_crash_resume,
    }[SCENARIO](workdir)


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()), flush=True)
    if PROCESSES > 1 and SCENARIO not in ("kill", "crash-train"):
        # Process 0 hosts the coordination service: its shutdown waits for
        # the other process, which would abort if the service went first.
        # `kill` has no peer left to wait for.
        jax.distributed.shutdown()
    os._exit(0)
