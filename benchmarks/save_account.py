"""Section p: where one save's cost to the training loop goes.

Trains the harness's model with `save_freq=5` in interleaved rounds of
three configurations:

- `none`: no callback;
- `fastbackup`: the default callback;
- `fastbackup, no write`: the same callback, its store's `commit` replaced
  by one that writes nothing (the snapshot, encoding and pruning still run),
  which separates what the write costs the steps beside it from what the
  save costs on the training thread.

and splits the loop's cost per save (up to the last batch's end; the wait
for the last write at the end of `fit` is given apart) into: the training thread's blocking
time (the copy into host buffers, and the rest of the save); what the steps
after the save lose without any write (caches, TensorFlow's threads); and
what the write costs the steps it runs beside. The writer thread's CPU time
per save is measured with `time.thread_time` on that thread (encoding, and
the commit: write, fsync, rename), and a memcpy of the state's bytes in one
`np.copyto` is the reference.

Cache misses are not counted: `perf stat` reports the hardware cache events
as `<not supported>` on this class of VM.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from benchmarks.measurements import LoopTiming, median, round_order, settle
from benchmarks.models import ModelSpec, fit_inputs, make_data, state_nbytes

SAVE_FREQ = 5
# Steps per run: enough saves per run for medians (12 at 60 steps), fewer
# on the full model, whose steps take over a second here.
STEPS = {"full": 30}
DEFAULT_STEPS = 60
CONFIGS = ("none", "fastbackup", "fastbackup, no write")


class _Instrumented:
    """A fastbackup callback whose save and write phases are timed."""

    def __init__(self, directory: str, write: bool) -> None:
        import fastbackup
        from fastbackup.stores.base import CommitResult

        self.callback = fastbackup.BackupAndRestore(
            directory, save_freq=SAVE_FREQ, delete_checkpoint=False)
        self.write = write
        self.copy_s: list[float] = []
        self.writer_cpu_s: list[float] = []
        self.commit_cpu_s: list[float] = []
        self._result = CommitResult

    def attach(self, model: keras.Model) -> None:
        """Makes the writer with one untimed save, then wraps its phases."""
        cb = self.callback
        cb.set_model(model)
        cb.on_train_begin()
        cb._save(0, 0, block=True)
        cb.on_train_end()
        snapper, writer = cb._snapshotter, cb._writer
        take_split = snapper.take_split

        def timed_take(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return take_split(*args, **kwargs)
            finally:
                self.copy_s.append(time.perf_counter() - start)

        snapper.take_split = timed_take
        write_one = writer._write
        commit = writer.store.commit

        def timed_write(*args: Any) -> None:
            start = time.thread_time()
            write_one(*args)
            self.writer_cpu_s.append(time.thread_time() - start)

        def timed_commit(step: int, encoded: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                if self.write:
                    return commit(step, encoded, *args, **kwargs)
                return self._result("", step, 0, 0.0)
            finally:
                self.commit_cpu_s.append(time.thread_time() - start)

        writer._write = timed_write
        writer.store.commit = timed_commit

    def clear(self) -> None:
        for samples in (self.copy_s, self.writer_cpu_s, self.commit_cpu_s):
            samples.clear()


def _memcpy_s(nbytes: int, rounds: int) -> float:
    """One `np.copyto` of `nbytes` into an already touched buffer."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    times = []
    for _ in range(max(rounds, 3)):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    model: keras.Model,
    spec: ModelSpec,
    work_dir: str,
    rounds: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Section p: the account of one save's cost, in seconds per save."""
    steps = STEPS.get(spec.name, DEFAULT_STEPS)
    x, y = make_data(spec, steps=steps, seed=3)
    inputs = fit_inputs(spec, x, y)
    warm = 3 * spec.batch_size
    model.fit(x[:warm], y[:warm], batch_size=spec.batch_size, epochs=1,
              shuffle=False, verbose=0)
    instruments = {
        "fastbackup": _Instrumented(os.path.join(work_dir, "p-fb"), True),
        "fastbackup, no write": _Instrumented(os.path.join(work_dir, "p-nowrite"), False),
    }
    for inst in instruments.values():
        inst.attach(model)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    saves_per_run = steps // SAVE_FREQ
    settle()
    for r in range(rounds):
        log(f"  round {r + 1}/{rounds}")
        for config in round_order(list(CONFIGS), r):
            inst = instruments.get(config)
            timing = LoopTiming()
            callbacks = [timing.start] + ([inst.callback] if inst else []) + [timing.stop]
            if inst:
                inst.clear()
                inst.callback.blocking_seconds.clear()
            model.fit(**inputs, epochs=1, verbose=0, callbacks=callbacks)
            step_times = timing.step_times()
            save_steps = [t for i, t in enumerate(step_times) if (i + 1) % SAVE_FREQ == 0]
            next_steps = [t for i, t in enumerate(step_times)
                          if i % SAVE_FREQ == 0 and i > 0]
            others = [t for i, t in enumerate(step_times)
                      if (i + 1) % SAVE_FREQ != 0 and (i % SAVE_FREQ != 0 or i == 0)]
            run: dict[str, Any] = {
                "loop_s": timing.loop_s,
                "steps_s": timing.steps_s,
                "end_s": timing.end_s,
                "cpu_s": timing.cpu_s,
                "save_step_s": median(save_steps),
                "next_step_s": median(next_steps),
                "other_step_s": median(others),
                "step_s": median(step_times),
            }
            if inst:
                cb = inst.callback
                run.update(
                    saves=len(cb.blocking_seconds),
                    blocking_s=median(cb.blocking_seconds),
                    copy_s=median(inst.copy_s),
                    writer_cpu_s=median(inst.writer_cpu_s),
                    commit_cpu_s=median(inst.commit_cpu_s),
                )
            runs[config].append(run)
            log(f"    {config:<22} loop {timing.loop_s:6.2f} s")
            for d in ("p-fb", "p-nowrite"):
                shutil.rmtree(os.path.join(work_dir, d), ignore_errors=True)
            settle()
    for inst in instruments.values():
        inst.callback._writer.close()

    def per_save(config: str, field: str = "steps_s") -> float:
        """Median over rounds of (config - none) / saves in that round."""
        return statistics.median(
            (run[field] - runs["none"][i][field]) / saves_per_run
            for i, run in enumerate(runs[config]))

    def med(config: str, field: str) -> float:
        return statistics.median(run[field] for run in runs[config])

    fb, nw = "fastbackup", "fastbackup, no write"
    cost = per_save(fb)
    cost_no_write = per_save(nw)
    blocking = med(fb, "blocking_s")
    copy = med(fb, "copy_s")
    none_step = med("none", "other_step_s")
    account = {
        "loop_cost_per_save_s": cost,
        # The end of fit waits for the last write (delete_checkpoint=False);
        # the per-save figures stop at the last batch.
        "end_wait_s": med(fb, "end_s") - med("none", "end_s"),
        "blocking_s": blocking,
        "copy_s": copy,
        "rest_of_save_s": blocking - copy,
        "after_save_s": cost_no_write - med(nw, "blocking_s"),
        "write_beside_steps_s": cost - cost_no_write,
        "writer_cpu_s": med(fb, "writer_cpu_s"),
        "writer_commit_cpu_s": med(fb, "commit_cpu_s"),
        "writer_encode_cpu_s": med(fb, "writer_cpu_s") - med(fb, "commit_cpu_s"),
        "writer_cpu_no_write_s": med(nw, "writer_cpu_s"),
        "process_cpu_per_save_s": per_save(fb, "cpu_s"),
        "save_step_extra_s": med(fb, "save_step_s") - none_step,
        "next_step_extra_s": med(fb, "next_step_s") - none_step,
        "other_step_extra_s": med(fb, "other_step_s") - none_step,
        "memcpy_state_s": _memcpy_s(state_nbytes(model), rounds),
        "overhead": med(fb, "steps_s") / med("none", "steps_s") - 1.0,
    }
    return {
        "steps": steps,
        "save_freq": SAVE_FREQ,
        "saves_per_run": saves_per_run,
        "runs": runs,
        "account": account,
    }
