"""Section e: resident memory added by saving, one fresh process per probe.

Resident memory is a property of the whole process, and what one
measurement frees may stay mapped for the next, so each probe runs in its
own interpreter (`python -m benchmarks.memory ...`), builds and warms up its
model, takes its baseline, then resets the kernel's high-water mark
(`/proc/self/clear_refs`) and reads it back afterwards (`VmHWM`). A thread
sampling `VmRSS` every millisecond backs the high-water mark up where
`clear_refs` is not writable.

Two kinds of probe:

* "saves": three saves in a row, each waited for until durable, without
  training; the peak over the baseline is what saving adds.
* "fit": a short `fit` saving every other step, against the same `fit`
  without a callback in another process; the difference of the two peaks
  is what saving adds while training (TensorFlow's copy-on-write included).

Each probe also reports the memory still resident once the callback is
deleted and garbage-collected ("retained").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * _PAGE


def reset_high_water_mark() -> bool:
    """Resets `VmHWM` to the current RSS; False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples RSS from a thread; `peak` is the largest value seen."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.peak = rss_bytes()
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def _measure(action: Callable[[], None]) -> dict[str, Any]:
    """Runs `action` and returns the baseline, peaks and final RSS."""
    gc.collect()
    time.sleep(0.2)
    baseline = rss_bytes()
    hwm_ok = reset_high_water_mark()
    with RssSampler() as sampler:
        action()
    peak_hwm = _status_kib("VmHWM") * 1024 if hwm_ok else None
    peak = max(sampler.peak, peak_hwm or 0)
    return {
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "peak_sampled_bytes": sampler.peak,
        "peak_hwm_bytes": peak_hwm,
        "added_bytes": peak - baseline,
        "after_bytes": rss_bytes(),
    }


def probe(tool: str, kind: str, spec_name: str, directory: str, saves: int) -> dict[str, Any]:
    """Runs one probe in this process (see the module docstring).

    Args:
        tool: "fastbackup", "keras" or "none" (only for kind "fit").
        kind: "saves" or "fit".
        spec_name: "quick", "medium" or "full".
        directory: the backup directory (created, then removed).
        saves: saves of a "saves" probe.

    Returns:
        Byte counts: baseline, peak, added (peak - baseline), retained.
    """
    import keras

    from benchmarks.models import SPECS, build_model, make_data, state_nbytes, warm_up

    spec = SPECS[spec_name]
    model = build_model(spec)
    warm_up(model, spec)
    state = state_nbytes(model)
    callback: Any = None

    if tool == "fastbackup":
        import fastbackup

        callback = fastbackup.BackupAndRestore(
            directory, save_freq=2 if kind == "fit" else "epoch"
        )
    elif tool == "keras":
        callback = keras.callbacks.BackupAndRestore(
            directory, save_freq=2 if kind == "fit" else "epoch"
        )
    elif tool != "none" or kind != "fit":
        raise ValueError(f"unknown probe {tool}/{kind}")

    if kind == "saves":
        callback.set_model(model)

        def action() -> None:
            if tool == "fastbackup":
                callback.on_train_begin()
                for i in range(saves):
                    callback._save(0, i, block=True)
                    callback.wait_until_finished()
                callback.on_train_end()
            else:
                for _ in range(saves):
                    callback._save_model()
    else:
        x, y = make_data(spec, steps=spec.memory_fit_steps, seed=3)

        def action() -> None:
            model.fit(
                x, y, batch_size=spec.batch_size, epochs=1, shuffle=False,
                verbose=0, callbacks=[callback] if callback is not None else [],
            )

    result = _measure(action)
    baseline = result["baseline_bytes"]
    del callback
    gc.collect()
    time.sleep(0.2)
    result.update(
        tool=tool, kind=kind, model=spec_name, state_bytes=state,
        retained_bytes=rss_bytes() - baseline,
    )
    shutil.rmtree(directory, ignore_errors=True)
    return result


def _command(tool: str, kind: str, spec_name: str, directory: str, saves: int) -> list[str]:
    return [sys.executable, "-m", "benchmarks.memory", "--tool", tool, "--kind", kind,
            "--model", spec_name, "--dir", directory, "--saves", str(saves)]


def run_probes(
    probes: list[tuple[str, str]],
    spec_name: str,
    work_dir: str,
    parallel: int,
    log: Callable[[str], None],
    saves: int = 3,
    timeout_s: float = 1200.0,
) -> dict[str, dict[str, Any]]:
    """Runs each `(tool, kind)` probe in a fresh interpreter.

    Resident memory is per process, so probes may run side by side
    (`parallel` at a time) without disturbing each other's figures; only
    the machine's total memory bounds `parallel`.

    Returns:
        `{"tool/kind": result}` in the order of `probes`.

    Raises:
        RuntimeError: a probe failed or printed no result.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pending = list(probes)
    running: list[tuple[str, subprocess.Popen[str], Any]] = []
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while pending or running:
            while pending and len(running) < max(parallel, 1):
                tool, kind = pending.pop(0)
                key = f"{tool}/{kind}"
                log(f"e: memory probe {key} (fresh process)")
                errors = tempfile.TemporaryFile(mode="w+")
                proc = subprocess.Popen(
                    _command(tool, kind, spec_name,
                             os.path.join(work_dir, f"mem-{tool}-{kind}"), saves),
                    stdout=subprocess.PIPE, stderr=errors, text=True,
                    cwd=package_root, env=env,
                )
                running.append((key, proc, errors))
            key, proc, errors = running.pop(0)
            try:
                out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise RuntimeError(f"memory probe {key} timed out") from None
            errors.seek(0)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = "\n".join(errors.read().splitlines()[-15:])
                raise RuntimeError(f"memory probe {key} failed "
                                   f"(exit {proc.returncode}):\n{tail}")
            errors.close()
            results[key] = json.loads(lines[-1])
    finally:
        for _, proc, errors in running:
            proc.kill()
            proc.communicate()
            errors.close()
    return {f"{t}/{k}": results[f"{t}/{k}"] for t, k in probes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True, choices=("fastbackup", "keras", "none"))
    parser.add_argument("--kind", required=True, choices=("saves", "fit"))
    parser.add_argument("--model", required=True, choices=("quick", "medium", "full"))
    parser.add_argument("--dir", required=True)
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = probe(args.tool, args.kind, args.model, args.dir, args.saves)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
