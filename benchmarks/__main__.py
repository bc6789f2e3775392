"""Command line of the benchmark harness: `python3 -m benchmarks --help`.

Runs sections a (blocking time per save), c (durable write throughput) and
d (restore) in one set of interleaved rounds on one model, b (training-loop
overhead) in another, e (resident memory) in fresh subprocesses, j
(snapshot strategies on the JAX trainer) in a JAX subprocess, s (an
S3 bucket on a local moto server: upload, restore, training loop), and m
(a sharded JAX model in 1 process and in 2, fastbackup and Orbax, in worker
subprocesses), and p (where one save's cost to the training loop goes);
prints the
tables and PASS/MISS per target; writes `results.json` and `results.png`
into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SECTIONS = "abcdejsmp"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks",
        description="fastbackup vs Keras BackupAndRestore vs the machine's floors.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small model (Dense(1024) layers, ~76 MB of state); "
                             "about 3 minutes (181 s measured on 2 quiet cores, "
                             "sections s and m included). Default: the "
                             "~100M-parameter model (~1.2 GB of state), about "
                             "27 minutes (1,624 s measured; section b with "
                             "Orbax's saves takes 19 of them)")
    parser.add_argument("--model", choices=("quick", "medium", "full"),
                        default=None,
                        help="the model every section but s runs on: quick "
                             "(as --quick), medium (Dense(2048) layers, "
                             "~302 MB of state, ~0.1 s steps) or full "
                             "(the default)")
    parser.add_argument("--out", default="bench-results",
                        help="folder for results.json and results.png "
                             "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of the training-loop runs "
                             "(section b; default: %(default)s)")
    parser.add_argument("--save-rounds", type=int, default=5,
                        help="interleaved rounds of single saves, writes and "
                             "restores (sections a, c, d, m; default: %(default)s)")
    parser.add_argument("--dir", default=None,
                        help="parent folder of the backups written; default: a "
                             "temporary folder on the current directory's disk "
                             "(never tmpfs, where fsync does nothing)")
    parser.add_argument("--sections", default=SECTIONS,
                        help=f"subset of {SECTIONS!r} to run (a, c and d run together)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the backup folder instead of deleting it")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.save_rounds < 1:
        parser.error("--repeats and --save-rounds must be at least 1")
    if not set(args.sections) <= set(SECTIONS):
        parser.error(f"--sections takes letters of {SECTIONS!r}")
    if args.quick and args.model not in (None, "quick"):
        parser.error(f"--quick is --model quick. Received: --model {args.model}")
    args.model = "quick" if args.quick else (args.model or "full")
    args.quick = args.model == "quick"
    return args


def _log(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def _section(results: dict[str, Any], name: str) -> Iterator[None]:
    """Records a section's failure and goes on with the next section.

    A full run takes most of an hour: one section failing (a server that
    stops answering) must not throw away what the others measured.
    """
    t0 = time.perf_counter()
    try:
        yield
    except Exception:  # any failure of a section, kept in the results
        trace = traceback.format_exc()
        _log(f"section {name} FAILED, the run goes on:\n{trace}")
        results.setdefault("errors", {})[name] = trace
    finally:
        results["section_seconds"][name] = time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the selected sections and returns everything measured."""
    from benchmarks import machine, measurements, memory, models

    started = time.perf_counter()
    work_dir = machine.make_work_dir(args.dir)
    spec = models.SPECS[args.model]
    results: dict[str, Any] = {
        "command": " ".join(["python3 -m benchmarks"] + sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine.describe(work_dir),
        "model": {"name": spec.name, "units": spec.units, "input_dim": spec.input_dim,
                  "hidden_layers": spec.hidden_layers, "batch_size": spec.batch_size,
                  "parameters": spec.parameters},
        "settings": {"repeats": args.repeats, "save_rounds": args.save_rounds,
                     "sections": args.sections,
                     "fastbackup_env": {k: v for k, v in os.environ.items()
                                        if k.startswith("FASTBACKUP_")}},
        "section_seconds": {},
    }
    fs = results["machine"]["filesystem"] or {}
    _log(f"backups in {work_dir} ({fs.get('fs_type', '?')} on {fs.get('source', '?')})")
    if machine.is_memory_fs(work_dir):
        _log("WARNING: the backup folder is on tmpfs: fsync does nothing there, "
             "section c measures memory, not a disk")
    try:
        wants = set(args.sections)
        model = None
        if wants & set("abcdp") or (args.quick and "s" in wants):
            _log(f"building the {spec.name} model ({spec.parameters / 1e6:.1f} M parameters)")
            model = models.build_model(spec)
            models.warm_up(model, spec)
            results["state_bytes"] = models.state_nbytes(model)
        if wants & set("acd"):
            with _section(results, "acd"):
                _log(f"a/c: single saves, {args.save_rounds} rounds")
                saves = measurements.measure_saves(model, work_dir, args.save_rounds, _log)
                results["a_c_saves"] = {k: v for k, v in saves.items() if k != "files"}
                if "d" in wants:
                    _log(f"d: restore, {args.save_rounds} rounds")
                    results["d_restore"] = measurements.measure_restore(
                        model, spec, saves["files"], args.save_rounds, _log)
        if "c" in wants:
            with _section(results, "c_cpu"):
                _log(f"c: writer CPU per GB by write path, {args.save_rounds} rounds")
                results["c_writer_cpu"] = measurements.measure_writer_cpu(
                    model, work_dir, args.save_rounds, _log)
        if "b" in wants:
            with _section(results, "b"):
                _log(f"b: training loop, {spec.loop_steps} steps per run, {args.repeats} rounds")
                results["b_training_loop"] = measurements.measure_training_loop(
                    model, spec, work_dir, args.repeats, (1, 5, "epoch"), _log)
        if "p" in wants:
            from benchmarks import save_account

            with _section(results, "p"):
                _log(f"p: one save's cost in the loop, {args.repeats} rounds")
                results["p_save_account"] = save_account.measure(
                    model, spec, work_dir, args.repeats, _log)
        if "s" in wants:
            from benchmarks import object_storage

            with _section(results, "s"):
                # On the quick model always: its targets are stated for it,
                # and a local moto server takes minutes per GB uploaded.
                s_model = model
                if spec is not models.QUICK:
                    model = None  # the full model's memory goes first
                    s_model = models.build_model(models.QUICK)
                    models.warm_up(s_model, models.QUICK)
                _log(f"s: object store (moto S3 on 127.0.0.1), quick model, "
                     f"{args.save_rounds} rounds, then {args.repeats} "
                     "training-loop rounds")
                results["s_object_store"] = object_storage.measure(
                    s_model, models.QUICK, work_dir, args.save_rounds,
                    args.repeats, _log)
                results["s_object_store"]["model"] = models.QUICK.name
                del s_model
        del model
        if "e" in wants:
            with _section(results, "e"):
                # Two probes side by side (a full one takes ~4 GB). The in-fit
                # probes (three more interpreters) are left out of --quick, to
                # keep it within two minutes on two cores.
                wanted = [("fastbackup", "saves"), ("keras", "saves")]
                if not args.quick:
                    wanted += [("none", "fit"), ("fastbackup", "fit"), ("keras", "fit")]
                probes = memory.run_probes(wanted, spec.name, work_dir, parallel=2, log=_log)
                results["e_memory"] = probes
                results.setdefault("state_bytes", probes["fastbackup/saves"]["state_bytes"])
        if "j" in wants:
            from benchmarks import jax_snapshot

            with _section(results, "j"):
                _log(f"j: JAX snapshot strategies, {args.repeats} rounds (subprocess)")
                results["j_jax_snapshot"] = jax_snapshot.run_subprocess(
                    spec.name, args.repeats, log=_log)
        if "m" in wants:
            from benchmarks import sharded

            with _section(results, "m"):
                _log(f"m: a sharded JAX model, 1 process x 4 CPU devices and 2 x 2, "
                     f"{args.save_rounds} rounds (subprocesses)")
                results["m_sharded"] = sharded.measure(
                    args.quick, args.save_rounds, work_dir, log=_log)
    finally:
        if args.keep:
            _log(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["total_seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from benchmarks import report

    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    json_path = report.write_json(results, args.out)
    png_path = report.write_plot(results, args.out)
    m = results["machine"]
    print()
    print(f"model: {results['model']['name']}, {results['model']['parameters'] / 1e6:.1f} M "
          f"parameters, {results.get('state_bytes', 0) / 1e6:,.0f} MB of state; "
          f"{m['usable_cpus']} CPUs, {m['ram_gb']} GiB RAM; "
          f"load {m['load_average_at_start']} -> {m['load_average_at_end']}")
    print()
    print(report.summary_table(results))
    print()
    print(report.detail_tables(results))
    print()
    print(report.verdict_lines(results))
    if results["model"]["name"] != "full":
        print(f"(targets are stated for the full model, but b5/b5o's per model; the "
              f"{results['model']['name']} model's other verdicts only indicate)")
    for name, trace in results.get("errors", {}).items():
        print(f"section {name} FAILED: {trace.strip().splitlines()[-1]}")
    print()
    print(f"wrote {json_path} and {png_path} in {results['total_seconds']:.0f} s")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
