"""Section j: what a snapshot costs on JAX, by strategy.

JAX arrays are immutable, which suggests a snapshot could be nearly free:
keep the arrays, write them later. The Keras JAX trainer, however, donates
the whole training state to every step (`donate_argnums=0`): the step reuses
those buffers for its outputs, and any array still pointing at them is
deleted. This section measures, inside a real `fit` on the benchmark model,
what each way around that costs the training thread:

- `none`: no snapshot (the baseline step time).
- `host_copy`: fastbackup's snapshot, a copy into reused host buffers.
- `hold_arrays`: keep the `jax.Array` objects, copy nothing. Records how many
  the next step deleted (a snapshot must survive until it is written).
- `hold_views`: keep zero-copy numpy views of the arrays. The buffers then
  have an external reference, so the next step cannot reuse them and
  allocates fresh outputs instead.
- `device_copy`: a jitted copy of the state dispatched at the batch end; the
  writer would read the copies later (that read is timed apart).
- `device_copy_reuse`: the same, but the copy donates the previous
  snapshot's arrays, so XLA writes into memory already faulted in (as
  `host_copy` reuses its buffers).

A snapshot is taken every `every` steps, at `on_train_batch_end`. Reported
per strategy: the time blocked at the batch end, the extra time of the step
that follows (against the median step of `none`), their sum, and the
training-loop overhead against `none`. Strategies run interleaved, in
rounds, in one process. Run on its own with
`KERAS_BACKEND=jax python3 -m benchmarks.jax_snapshot [--quick]`; the main
harness runs it in a subprocess (section j).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

STRATEGIES = ("none", "host_copy", "hold_arrays", "hold_views", "device_copy",
              "device_copy_reuse")


class _Strategy:
    """A callback taking a snapshot every `every` steps one way, and timing."""

    def __init__(self, name: str, model: Any, every: int) -> None:
        import jax
        import numpy as np

        from fastbackup.snapshot import Snapshotter

        self.name = name
        self.model = model
        self.every = every
        self.blocking: list[float] = []
        self.after: list[float] = []  # step durations right after a snapshot
        self.others: list[float] = []  # every other step's duration
        self.writer_read: list[float] = []
        self.deleted: list[int] = []
        self.held: Any = None
        self._mark = 0.0
        self._after_snapshot = False
        self._snapshotter = Snapshotter(model)
        self._into = None
        self._np = np
        self._jax = jax
        self._copy = jax.jit(lambda arrays: [a.copy() for a in arrays])
        self._copy_into = jax.jit(
            lambda old, new: [b.copy() for b in new], donate_argnums=0)
        self._spare: Any = None

    def _arrays(self) -> list[Any]:
        # Writes the trainer's live state back into the variables, as a
        # snapshot must first; cheap (no array is copied).
        self.model.jax_state_sync()
        return [v.value for _, v in self._snapshotter.variables()]

    def prepare(self) -> None:
        """Takes one untimed snapshot: buffers and jitted copy are ready."""
        if self.name == "host_copy":
            self._into = self._snapshotter.take(self._into, 0, 0)
        elif self.name == "device_copy":
            self._jax.block_until_ready(self._copy(self._arrays()))
        elif self.name == "device_copy_reuse":
            self._spare = self._copy(self._arrays())
            self._spare = self._copy_into(self._spare, self._arrays())
            self._jax.block_until_ready(self._spare)

    def _release(self) -> None:
        """What the writer does with the previous snapshot, and drops it."""
        if self.held is None:
            return
        if self.name == "hold_arrays":
            self.deleted.append(sum(a.is_deleted() for a in self.held))
        elif self.name.startswith("device_copy"):
            t0 = time.perf_counter()
            views = [self._np.asarray(a) for a in self.held]
            self.writer_read.append(time.perf_counter() - t0)
            # Views dropped before the arrays are donated again.
            del views
            if self.name == "device_copy_reuse":
                self._spare = self.held
        self.held = None

    def _take(self, batch: int) -> None:
        if self.name == "host_copy":
            self._into = self._snapshotter.take(self._into, 0, batch)
        elif self.name == "hold_arrays":
            self.held = self._arrays()
        elif self.name == "hold_views":
            self.held = [self._np.asarray(a) for a in self._arrays()]
        elif self.name == "device_copy":
            self.held = self._copy(self._arrays())
        elif self.name == "device_copy_reuse":
            spare, self._spare = self._spare, None
            self.held = self._copy_into(spare, self._arrays())

    def callback(self) -> Any:
        import keras

        strategy = self

        class Timed(keras.callbacks.Callback):
            # Never reads `self.model`: on JAX that property syncs the
            # trainer's state at every batch end, which fastbackup does not.
            def on_train_begin(self, logs: Any = None) -> None:
                strategy._mark = time.perf_counter()

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                now = time.perf_counter()
                step = now - strategy._mark
                if strategy._after_snapshot:
                    strategy.after.append(step)
                    strategy._release()
                else:
                    strategy.others.append(step)
                strategy._after_snapshot = False
                if strategy.name != "none" and (batch + 1) % strategy.every == 0:
                    strategy._take(batch)
                    strategy.blocking.append(time.perf_counter() - now)
                    strategy._after_snapshot = True
                strategy._mark = time.perf_counter()

            def on_train_end(self, logs: Any = None) -> None:
                strategy._release()
                strategy._after_snapshot = False

        return Timed()


def measure(spec_name: str, rounds: int, every: int, steps: int,
            log: Any = print) -> dict[str, Any]:
    """Runs every strategy `rounds` times, interleaved; returns the figures."""
    import keras

    from benchmarks import models
    from benchmarks.measurements import median, round_order

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "section j needs KERAS_BACKEND=jax. Received: "
            f"KERAS_BACKEND={keras.backend.backend()}"
        )
    spec = models.SPECS[spec_name]
    model = models.build_model(spec)
    models.warm_up(model, spec)
    x, y = models.make_data(spec, steps=steps, seed=2)
    strategies = {name: _Strategy(name, model, every) for name in STRATEGIES}
    loops: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    for name in STRATEGIES:
        strategies[name].prepare()
    for r in range(rounds):
        for name in round_order(STRATEGIES, r):
            strategy = strategies[name]
            timed = strategy.callback()
            t0 = time.perf_counter()
            model.fit(x, y, batch_size=spec.batch_size, epochs=1, shuffle=False,
                      verbose=0, callbacks=[timed])
            loops[name].append(time.perf_counter() - t0)
            log(f"  j round {r + 1}/{rounds} {name}: {loops[name][-1]:.2f} s")
    base_step = median(strategies["none"].others)
    base_loop = median(loops["none"])
    out: dict[str, Any] = {
        "every": every, "steps": steps, "rounds": rounds,
        "state_bytes": models.state_nbytes(model),
        "tensors": len(strategies["none"]._snapshotter.variables()),
        "step_s": base_step, "strategies": {},
    }
    for name, s in strategies.items():
        blocking = median(s.blocking) if s.blocking else 0.0
        after = median(s.after)
        extra = after - base_step if after is not None and base_step else None
        loop = median(loops[name])
        out["strategies"][name] = {
            "blocking_s": blocking,
            "next_step_s": after,
            "next_step_extra_s": extra,
            "cost_s": blocking + extra if extra is not None else None,
            "loop_s": loop,
            "loop_overhead": loop / base_loop - 1 if base_loop else None,
            "writer_read_s": median(s.writer_read),
            "deleted_by_next_step": (
                max(s.deleted) if s.deleted else None
            ),
            "snapshots": len(s.blocking),
        }
    return out


def run_subprocess(spec_name: str, rounds: int, log: Any = print) -> dict[str, Any]:
    """Runs `measure` under `KERAS_BACKEND=jax` in a fresh interpreter.

    The harness's own process has its backend fixed at import; JAX needs
    its own. Returns the figures, or `{"error": ...}` saying why none.
    """
    import subprocess
    import tempfile

    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "benchmarks.jax_snapshot", "--json",
           "--rounds", str(rounds), "--model", spec_name]
    result = None
    # stderr goes to a file: a pipe read only after stdout ends would
    # deadlock once the child's log output filled it.
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                stderr=errors, text=True,
                                cwd=os.path.dirname(os.path.dirname(
                                    os.path.abspath(__file__))))
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            else:
                log(line.rstrip("\n"))
        proc.wait()
        errors.seek(0)
        err = errors.read()
    if proc.returncode != 0 or result is None:
        tail = err.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit status {proc.returncode}: {tail[0]}"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.jax_snapshot",
        description="Snapshot strategies on the Keras JAX trainer (section j).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="the quick model (~76 MB of state); as --model quick")
    parser.add_argument("--model", choices=("quick", "medium", "full"),
                        default="full",
                        help="the model (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--every", type=int, default=5,
                        help="steps between snapshots (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print the figures as one 'RESULT {json}' line")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.every < 1:
        parser.error("--rounds and --every must be at least 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    steps = 4 * args.every
    result = measure("quick" if args.quick else args.model, args.rounds,
                     args.every, steps, log=lambda m: print(m, flush=True))
    if args.json:
        print("RESULT " + json.dumps(result), flush=True)
    else:
        from benchmarks.report import jax_snapshot_table

        print(jax_snapshot_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
