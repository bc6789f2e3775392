"""Tests of the command line: `python -m fastbackup inspect|verify|export|bench`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings

import keras
import numpy as np
import pytest

import fastbackup
from fastbackup import cli
from fastbackup import format as fmt
from fastbackup.format import CheckpointReader
from fastbackup.snapshot import HostSnapshot, TensorSpec, collect_variables
from fastbackup.stores.local import LOCK_NAME, LocalStore
from fastbackup.stores.names import MODEL_CONFIG_NAME, checkpoint_name
from tests.conftest import TENSOR_BYTE, flip_byte, make_data, make_model

# Helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A backup directory with two checkpoints (steps 0 and 1) of a model."""
    directory = tmp_path_factory.mktemp("trained") / "backup"
    keras.utils.set_random_seed(1234)
    x, y = make_data()
    model = make_model()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(directory, double_checkpoint=True,
                                    delete_checkpoint=False)])
    assert [s for s, _ in LocalStore(str(directory)).list_checkpoints()] == [1, 0]
    return directory


@pytest.fixture
def backup(trained_dir, tmp_path):
    """A private copy of `trained_dir`, free to damage."""
    copy = tmp_path / "backup"
    shutil.copytree(trained_dir, copy)
    return copy


def checkpoint_path(directory, step):
    return os.path.join(directory, checkpoint_name(step))


def read_checkpoint(path) -> dict[str, np.ndarray]:
    with CheckpointReader(path) as reader:
        out = {}
        for entry in reader.entries:
            array = np.empty(entry.shape, entry.np_dtype)
            reader.read_tensor(entry, array)
            out[entry.name] = array
    return out


def write_checkpoint(directory, step, arrays, epoch=0, batch=0, policy=None):
    """Writes one checkpoint of `arrays` synchronously, without a model."""
    specs = [
        TensorSpec(f"model.{i}", f"layer/var_{i}", a.dtype, a.shape)
        for i, a in enumerate(arrays)
    ]
    snapshot = HostSnapshot(specs, list(arrays), epoch=epoch, batch=batch,
                            taken_at=time.time())
    os.makedirs(directory, exist_ok=True)
    encoded = fmt.encode(snapshot, policy or fmt.CompressionPolicy(None), step)
    return LocalStore(str(directory)).commit(step, encoded, sync=False).path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# inspect -----------------------------------------------------------------------


def test_inspect_describes_every_checkpoint(backup, capsys):
    code, out, err = run(capsys, "inspect", backup)
    assert code == 0 and err == ""
    newest = out.index("ckpt-000000000001.fbk")
    older = out.index("ckpt-000000000000.fbk")
    assert newest < older
    assert "step 1, epoch 2, batch 0" in out
    assert "step 0, epoch 1, batch 0" in out
    assert out.count("ok (every checksum verified)") == 2
    # Variables with their Keras paths, dtypes, shapes and codecs.
    with CheckpointReader(checkpoint_path(backup, 1)) as reader:
        kernel, iterations = reader.entries[0], reader.entries[9]
    assert kernel.path.endswith("/kernel") and iterations.name == "optimizer.0"
    assert re.search(rf"model\.0 +{re.escape(kernel.path)} +float32 +\(6, 8\) +raw ", out)
    assert re.search(rf"optimizer\.0 +{re.escape(iterations.path)} +int(32|64) +\(\) ", out)
    assert "compression ratio" in out and " raw " in out
    assert "ago)" in out


def test_inspect_json_matches_the_checkpoint(backup, capsys):
    code, out, err = run(capsys, "inspect", "--json", backup)
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["lock_file"] is True and data["temp_files"] == []
    assert [c["step"] for c in data["checkpoints"]] == [1, 0]
    newest = data["checkpoints"][0]
    with CheckpointReader(checkpoint_path(backup, 1)) as reader:
        assert newest["file"] == reader.path
        assert (newest["epoch"], newest["batch"]) == (reader.epoch, reader.batch)
        assert newest["created"] == reader.meta["created"]
        assert newest["file_size"] == reader.file_size
        assert newest["format_version"] == reader.version == fmt.VERSION
        assert newest["tensors"] == [
            {"name": e.name, "path": e.path, "dtype": e.dtype,
             "shape": list(e.shape), "codec": e.codec,
             "stored_size": e.stored_size, "raw_size": e.raw_size,
             "crc32c": f"{e.crc32c:08x}"}
            for e in reader.entries
        ]
        raw = sum(e.raw_size for e in reader.entries)
        stored = sum(e.stored_size for e in reader.entries)
    assert newest["status"] == "ok" and newest["error"] is None
    assert (newest["raw_bytes"], newest["stored_bytes"]) == (raw, stored)
    assert newest["compression_ratio"] == raw / stored
    assert newest["age_seconds"] >= 0
    assert newest["extra"] == reader.meta["extra"]


def test_inspect_shows_compressed_tensors(tmp_path, capsys):
    # A slow "disk" makes compression pay for any compressible tensor.
    policy = fmt.CompressionPolicy(1, disk_bytes_per_s=1e3)
    zeros = np.zeros((256, 256), np.float32)
    noise = np.random.default_rng(0).random(16, dtype=np.float32)
    write_checkpoint(tmp_path, 0, [zeros, noise], epoch=3, batch=7,
                     policy=policy)
    code, out, _ = run(capsys, "inspect", "--json", tmp_path)
    assert code == 0
    [ckpt] = json.loads(out)["checkpoints"]
    assert [t["codec"] for t in ckpt["tensors"]] == ["zstd", "raw"]
    assert ckpt["tensors"][0]["raw_size"] == zeros.nbytes
    assert ckpt["tensors"][0]["stored_size"] < zeros.nbytes // 100
    assert ckpt["compression_ratio"] > 100
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (0, 3, 7)
    code, out, _ = run(capsys, "inspect", tmp_path)
    assert code == 0 and "zstd" in out and "layer/var_0" in out


def test_inspect_reports_damage_and_exits_1(backup, capsys):
    flip_byte(checkpoint_path(backup, 1), TENSOR_BYTE)
    code, out, _ = run(capsys, "inspect", "--json", backup)
    assert code == 1
    newest, older = json.loads(out)["checkpoints"]
    assert newest["status"] == "damaged"
    assert "checksum mismatch in tensor model.0" in newest["error"]
    assert older["status"] == "ok"


def test_inspect_no_verify_skips_checksums(backup, capsys):
    flip_byte(checkpoint_path(backup, 1), TENSOR_BYTE)
    code, out, _ = run(capsys, "inspect", "--json", "--no-verify", backup)
    assert code == 0
    assert {c["status"] for c in json.loads(out)["checkpoints"]} == {"unverified"}


def test_inspect_single_checkpoint_file(backup, capsys):
    code, out, _ = run(capsys, "inspect", checkpoint_path(backup, 0))
    assert code == 0
    assert "step 0, epoch 1, batch 0" in out and "ckpt-000000000001" not in out


# verify ------------------------------------------------------------------------


def test_verify_passes_on_intact_checkpoints(backup, capsys):
    code, out, err = run(capsys, "verify", backup)
    assert code == 0 and err == ""
    assert "2 checkpoint(s): 2 ok, 0 damaged" in out
    assert "newest valid checkpoint: ckpt-000000000001.fbk" in out


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("flip_tensor", "checksum mismatch in tensor model.0"),
        ("flip_header", "header checksum mismatch"),
        ("truncate", "footer missing: the file is truncated"),
        ("garbage", "not a fastbackup checkpoint (bad magic)"),
    ],
)
def test_verify_names_damaged_checkpoint_and_why(backup, capsys, damage, reason):
    path = checkpoint_path(backup, 1)
    size = os.path.getsize(path)
    if damage == "flip_tensor":
        flip_byte(path, TENSOR_BYTE)
    elif damage == "flip_header":
        flip_byte(path, size - fmt.FOOTER_SIZE - 5)
    elif damage == "truncate":
        os.truncate(path, size // 2)
    else:
        with open(path, "wb") as f:
            f.write(b"this is not a checkpoint" * 10)
    code, out, _ = run(capsys, "verify", backup)
    assert code == 1
    assert f"DAMAGED  ckpt-000000000001.fbk  {reason}" in out
    assert "ok       ckpt-000000000000.fbk" in out
    assert "2 checkpoint(s): 1 ok, 1 damaged" in out
    assert "newest valid checkpoint: ckpt-000000000000.fbk" in out


def test_verify_json(backup, capsys):
    flip_byte(checkpoint_path(backup, 0), TENSOR_BYTE)
    code, out, _ = run(capsys, "verify", "--json", backup)
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert [(c["step"], c["status"]) for c in data["checkpoints"]] == [
        (1, "ok"), (0, "damaged")]
    assert data["newest_valid"] == checkpoint_path(backup, 1)


def test_verify_reports_temp_files_without_deleting_them(backup, capsys):
    temp = backup / ".ckpt-000000000002.fbk.0123456789abcdef.tmp"
    temp.write_bytes(b"partial")
    code, out, _ = run(capsys, "verify", backup)
    assert code == 0
    assert "temp     .ckpt-000000000002.fbk.0123456789abcdef.tmp" in out
    assert "1 temporary file(s)" in out
    assert temp.read_bytes() == b"partial"
    code, out, _ = run(capsys, "inspect", "--json", backup)
    assert json.loads(out)["temp_files"] == [str(temp)]
    assert temp.exists()


def test_verify_directory_with_only_a_lock_file(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_text("123")
    code, out, _ = run(capsys, "verify", tmp_path)
    assert code == 0
    assert "0 checkpoint(s)" in out and "no checkpoint" in out


def test_verify_single_damaged_file(backup, capsys):
    path = checkpoint_path(backup, 0)
    flip_byte(path, TENSOR_BYTE)
    code, out, _ = run(capsys, "verify", path)
    assert code == 1 and "DAMAGED  ckpt-000000000000.fbk" in out


# Bad directories ---------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["inspect"], ["verify"], ["export", "--model-factory", "x:y"]])
def test_missing_directory_exits_2(tmp_path, capsys, command):
    missing = tmp_path / "nope"
    argv = [command[0], missing, *command[1:]]
    if command[0] == "export":
        argv.insert(2, tmp_path / "out.weights.h5")
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err == f"fastbackup: error: {missing}: no such file or directory\n"


@pytest.mark.parametrize("command", [
    ["inspect"], ["verify"], ["export", "--model-factory", "x:y"]])
def test_foreign_directory_exits_2(tmp_path, capsys, command):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    (foreign / "ckpt-1.fbk").write_bytes(b"not our name pattern")
    argv = [command[0], foreign, *command[1:]]
    if command[0] == "export":
        argv.insert(2, tmp_path / "out.weights.h5")
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert "not a fastbackup backup directory" in err and str(foreign) in err


def test_no_command_and_unknown_command_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "usage: fastbackup" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("inspect", "verify", "export", "bench"):
        assert command in out


# export ------------------------------------------------------------------------


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """Writes `fb_test_factories.py` and makes it importable."""
    source = textwrap.dedent("""
        import keras
        from tests.conftest import make_model

        def build():
            return make_model()

        def wider():
            return make_model(units=5)

        def unbuilt():
            model = keras.Sequential([keras.layers.Dense(3)])
            model.compile(optimizer="adam", loss="mse")
            return model

        def uncompiled():
            return keras.Sequential(
                [keras.layers.Input((6,)), keras.layers.Dense(3)])

        not_callable = 3

        def broken():
            raise RuntimeError("no GPU here")
    """)
    directory = tmp_path / "factories"
    directory.mkdir()
    (directory / "fb_test_factories.py").write_text(source)
    monkeypatch.syspath_prepend(str(directory))
    sys.modules.pop("fb_test_factories", None)
    yield "fb_test_factories"
    sys.modules.pop("fb_test_factories", None)


def loaded_state(weights_file):
    """`(name, Keras path, value)` of every variable of a fresh model (its
    optimizer built) after `load_weights(weights_file)`."""
    model = make_model()
    model.optimizer.build(model.trainable_variables)
    model.load_weights(weights_file)
    return [(name, v.path, np.array(v.numpy()))
            for name, v in collect_variables(model)]


def assert_matches_checkpoint(weights_file, ckpt_path):
    """`load_weights` gives the checkpoint's weights and optimizer state.

    Keras's weights format stores no SeedGenerator state and no compiled
    metric variables, so those are the only variables left out.
    """
    expected = read_checkpoint(ckpt_path)
    got = loaded_state(weights_file)
    compared = 0
    for name, path, value in got:
        if name.startswith("metrics.") or "seed_generator" in path:
            continue
        assert value.dtype == expected[name].dtype, name
        assert value.shape == expected[name].shape, name
        assert value.tobytes() == expected[name].tobytes(), name
        compared += 1
    assert compared == 9 - 1 + 14  # model minus the seed state, optimizer
    # The state really is trained state, not a fresh model's.
    iterations = next(value for name, _, value in got if name == "optimizer.0")
    assert int(iterations) == int(expected["optimizer.0"]) > 0


def test_export_with_model_factory_round_trips(backup, tmp_path, capsys, factory):
    out_file = tmp_path / "out.weights.h5"
    code, out, err = run(capsys, "export", backup, out_file,
                         "--model-factory", f"{factory}:build")
    assert code == 0, err
    assert "exported ckpt-000000000001.fbk (step 1, epoch 2, batch 0" in out
    assert "initial_epoch=2" in out
    assert_matches_checkpoint(out_file, checkpoint_path(backup, 1))
    # No temporary file is left next to the output.
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["backup", "factories", "out.weights.h5"])


def test_export_with_saved_keras_model(backup, tmp_path, capsys):
    untrained = make_model()
    model_file = tmp_path / "model.keras"
    untrained.save(model_file)
    kernel = np.array(untrained.layers[0].kernel.numpy())
    expected = read_checkpoint(checkpoint_path(backup, 1))
    assert kernel.tobytes() != expected["model.0"].tobytes()
    out_file = tmp_path / "out.weights.h5"
    code, _, err = run(capsys, "export", backup, out_file, "--model", model_file)
    assert code == 0, err
    assert_matches_checkpoint(out_file, checkpoint_path(backup, 1))


def test_export_skips_a_damaged_newest_checkpoint(backup, tmp_path, capsys,
                                                  factory):
    flip_byte(checkpoint_path(backup, 1), TENSOR_BYTE)
    out_file = tmp_path / "out.weights.h5"
    code, out, err = run(capsys, "export", backup, out_file,
                         "--model-factory", f"{factory}:build")
    assert code == 0
    assert "skipping damaged checkpoint" in err and "ckpt-000000000001" in err
    assert "exported ckpt-000000000000.fbk (step 0, epoch 1" in out
    assert_matches_checkpoint(out_file, checkpoint_path(backup, 0))


def test_export_step_selects_a_checkpoint(backup, tmp_path, capsys, factory):
    out_file = tmp_path / "out.weights.h5"
    code, out, _ = run(capsys, "export", backup, out_file, "--step", "0",
                       "--model-factory", f"{factory}:build")
    assert code == 0 and "ckpt-000000000000.fbk" in out
    assert_matches_checkpoint(out_file, checkpoint_path(backup, 0))
    code, _, err = run(capsys, "export", backup, tmp_path / "b.weights.h5",
                       "--step", "7", "--model-factory", f"{factory}:build")
    assert code == 1 and "no checkpoint with step 7" in err


def test_export_fails_when_every_checkpoint_is_damaged(backup, tmp_path, capsys,
                                                        factory):
    for step in (0, 1):
        flip_byte(checkpoint_path(backup, step), TENSOR_BYTE)
    out_file = tmp_path / "out.weights.h5"
    code, _, err = run(capsys, "export", backup, out_file,
                       "--model-factory", f"{factory}:build")
    assert code == 1 and "no valid checkpoint" in err
    assert not out_file.exists()


def test_export_refuses_a_mismatched_model(backup, tmp_path, capsys, factory):
    out_file = tmp_path / "out.weights.h5"
    code, out, err = run(capsys, "export", backup, out_file,
                         "--model-factory", f"{factory}:wider")
    assert code == 1 and out == ""
    assert "does not match the model" in err and "model.0" in err
    assert not out_file.exists()


def test_export_with_only_a_lock_file_fails(tmp_path, capsys, factory):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_NAME).write_text("1")
    code, _, err = run(capsys, "export", tmp_path / "b",
                       tmp_path / "o.weights.h5",
                       "--model-factory", f"{factory}:build")
    assert code == 1 and "no checkpoint to export" in err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("unbuilt", "the model is not built"),
        ("uncompiled", "the model is not compiled"),
        ("not_callable", "is not callable"),
        ("missing", "has no attribute 'missing'"),
        ("broken", "broken() raised RuntimeError: no GPU here"),
    ],
)
def test_export_rejects_unusable_factories(backup, tmp_path, capsys, factory,
                                           spec, message):
    out_file = tmp_path / "out.weights.h5"
    code, _, err = run(capsys, "export", backup, out_file,
                       "--model-factory", f"{factory}:{spec}")
    assert code == 2 and message in err
    assert not out_file.exists()


@pytest.mark.parametrize("spec", ["no_colon", "no_such_module_xyz:build", ":x"])
def test_export_rejects_bad_factory_specs(backup, tmp_path, capsys, spec):
    code, _, err = run(capsys, "export", backup, tmp_path / "o.weights.h5",
                       "--model-factory", spec)
    assert code == 2 and "--model-factory" in err


def test_export_rejects_missing_model_file(backup, tmp_path, capsys):
    code, _, err = run(capsys, "export", backup, tmp_path / "o.weights.h5",
                       "--model", tmp_path / "absent.keras")
    assert code == 2 and "absent.keras: no such file" in err


def test_export_takes_at_most_one_model_source(backup, tmp_path, capsys):
    out_file = tmp_path / "o.weights.h5"
    assert cli.main(["export", str(backup), str(out_file), "--model", "a",
                     "--model-factory", "b:c"]) == 2
    assert "--model" in capsys.readouterr().err


# export without the model: the config stored by the callback -------------------


def test_export_without_model_uses_the_stored_config(backup, tmp_path, capsys):
    out_file = tmp_path / "out.weights.h5"
    code, out, err = run(capsys, "export", backup, out_file)
    assert code == 0, err
    assert "exported ckpt-000000000001.fbk (step 1, epoch 2, batch 0" in out
    assert_matches_checkpoint(out_file, checkpoint_path(backup, 1))


def test_export_without_model_of_a_functional_model(tmp_path, capsys):
    def functional():
        inputs = keras.Input((6,), name="features")
        hidden = keras.layers.Dense(4, activation="relu")(inputs)
        skip = keras.layers.Dense(4)(inputs)
        outputs = keras.layers.Dense(1)(keras.layers.Add()([hidden, skip]))
        model = keras.Model(inputs, outputs)
        model.compile(optimizer="rmsprop", loss="mae", metrics=["mse"])
        return model

    x, y = make_data()
    trained = functional()
    trained.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(tmp_path / "b", delete_checkpoint=False)])
    out_file = tmp_path / "out.weights.h5"
    code, _, err = run(capsys, "export", tmp_path / "b", out_file)
    assert code == 0, err
    fresh = functional()
    fresh.load_weights(out_file)
    for a, b in zip(fresh.weights, trained.weights):
        assert np.array_equal(a.numpy(), b.numpy()), a.path


class UnregisteredModel(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)


def test_export_of_a_subclassed_model_asks_for_the_model(tmp_path, capsys,
                                                         factory):
    x, y = make_data()
    model = UnregisteredModel()
    model.compile(optimizer="adam", loss="mse")
    model(x[:1])
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(tmp_path / "b", delete_checkpoint=False)])
    code, out, err = run(capsys, "inspect", tmp_path / "b")
    assert code == 0
    assert "model config: not stored: model class" in out
    assert "UnregisteredModel is a subclassed model" in out
    out_file = tmp_path / "out.weights.h5"
    code, _, err = run(capsys, "export", tmp_path / "b", out_file)
    assert code == 1 and not out_file.exists()
    assert "cannot export without the model" in err
    assert "UnregisteredModel is a subclassed model that is not registered" in err
    assert "pass the model with --model or --model-factory" in err


def test_export_refuses_a_damaged_or_foreign_model_config(backup, tmp_path,
                                                          capsys):
    config = backup / MODEL_CONFIG_NAME
    data = config.read_bytes()
    config.write_bytes(data.replace(b'"Sequential"', b'"Sequentia1"', 1))
    out_file = tmp_path / "out.weights.h5"
    code, _, err = run(capsys, "export", backup, out_file)
    assert code == 1 and not out_file.exists()
    assert "does not belong to this checkpoint" in err
    config.unlink()
    code, _, err = run(capsys, "export", backup, out_file)
    assert code == 1 and "model-config.json does not exist" in err
    assert "--model-factory" in err


def test_model_config_is_written_once_per_fit(tmp_path, monkeypatch):
    writes = []
    real = LocalStore.write_object

    def counting(store, name, data):
        writes.append(store.directory)
        return real(store, name, data)

    monkeypatch.setattr(LocalStore, "write_object", counting)
    x, y = make_data()
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1,
                                     delete_checkpoint=False)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert cb.stats.saves + cb.stats.coalesced >= 8
    assert writes == [str(tmp_path)]
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cb])
    assert len(writes) == 2


def test_inspect_json_describes_the_model_config(backup, capsys):
    code, out, _ = run(capsys, "inspect", backup, "--json")
    assert code == 0
    document = json.loads(out)
    config = document["model_config"]
    assert config["class_name"] == "Sequential" and config["stored"] is True
    assert config["keras_version"] == keras.__version__
    assert config["file"].endswith(MODEL_CONFIG_NAME)
    for checkpoint in document["checkpoints"]:
        assert checkpoint["extra"]["model_config"] == config["crc32c"]


def test_export_checks_the_output_name(backup, tmp_path, capsys, factory):
    code, _, err = run(capsys, "export", backup, tmp_path / "out.h5",
                       "--model-factory", f"{factory}:build")
    assert code == 2 and "must end in `.weights.h5`" in err
    assert not (tmp_path / "out.h5").exists()


def test_export_does_not_overwrite_without_flag(backup, tmp_path, capsys, factory):
    out_file = tmp_path / "out.weights.h5"
    out_file.write_bytes(b"precious")
    code, _, err = run(capsys, "export", backup, out_file,
                       "--model-factory", f"{factory}:build")
    assert code == 2 and "--overwrite" in err
    assert out_file.read_bytes() == b"precious"
    code, _, err = run(capsys, "export", backup, out_file, "--overwrite",
                       "--model-factory", f"{factory}:build")
    assert code == 0, err
    assert_matches_checkpoint(out_file, checkpoint_path(backup, 1))


# bench -------------------------------------------------------------------------


def test_bench_passes_arguments_to_the_harness(tmp_path, monkeypatch, capfd):
    package = tmp_path / "benchmarks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import json, sys\n"
        "print('HARNESS', json.dumps(sys.argv[1:]))\n"
        "sys.exit(7)\n"
    )
    monkeypatch.chdir(tmp_path)
    code = cli.main(["bench", "--quick", "--out", "res", "--help"])
    out, _ = capfd.readouterr()
    assert code == 7
    assert 'HARNESS ["--quick", "--out", "res", "--help"]' in out


def test_bench_without_harness_exits_2(tmp_path, monkeypatch, capsys):
    def has_harness(entry):
        base = entry or os.getcwd()
        return os.path.exists(os.path.join(base, "benchmarks", "__main__.py"))

    monkeypatch.setattr(sys, "path", [p for p in sys.path if not has_harness(p)])
    monkeypatch.chdir(tmp_path)
    # A directory without __main__.py (a namespace package) is no harness.
    (tmp_path / "benchmarks").mkdir()
    code, out, err = run(capsys, "bench", "--quick")
    assert code == 2 and out == ""
    assert "benchmark harness is not importable" in err
    assert "source tree" in err and "[bench]" in err


# The real entry point ---------------------------------------------------------


def test_python_dash_m_fastbackup_verify(backup):
    flip_byte(checkpoint_path(backup, 1), TENSOR_BYTE)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "fastbackup", "verify", str(backup)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert "DAMAGED  ckpt-000000000001.fbk  checksum mismatch" in proc.stdout
    assert "ok       ckpt-000000000000.fbk" in proc.stdout


# Version 1 files -----------------------------------------------------------------


def test_version_1_backup_inspect_verify_export(backup, capsys, tmp_path,
                                                factory):
    # A backup written before the format's version 2 (aligned tensors) is
    # still inspected, verified and exported.
    from tests.conftest import stored_tensors, write_v1_file

    for step in (0, 1):
        path = checkpoint_path(backup, step)
        tensors, meta = stored_tensors(path)
        write_v1_file(path, tensors, meta["step"], meta["epoch"], meta["batch"],
                      meta["created"], meta["extra"])
        with CheckpointReader(path) as reader:
            assert reader.version == 1
    code, out, _ = run(capsys, "verify", backup)
    assert code == 0, out
    code, out, _ = run(capsys, "inspect", "--json", backup)
    assert code == 0
    checkpoints = json.loads(out)["checkpoints"]
    assert {c["status"] for c in checkpoints} == {"ok"}
    assert {c["format_version"] for c in checkpoints} == {1}
    out_file = tmp_path / "out.weights.h5"
    code, out, err = run(capsys, "export", backup, out_file,
                         "--model-factory", f"{factory}:build")
    assert code == 0, err
    assert "exported ckpt-000000000001.fbk (step 1, epoch 2, batch 0" in out
    assert_matches_checkpoint(out_file, checkpoint_path(backup, 1))
    flip_byte(checkpoint_path(backup, 1), fmt.PREFIX_SIZE + 24)
    code, out, _ = run(capsys, "verify", backup)
    assert code == 1
    assert "DAMAGED  ckpt-000000000001.fbk  checksum mismatch in tensor model.0" in out


# Multi-process checkpoints ------------------------------------------------------


@pytest.fixture
def parted(tmp_path):
    """A checkpoint of two parts (as two processes write it), of a model."""
    from tests.test_parts import write_parts

    keras.utils.set_random_seed(1234)
    model = make_model()
    x, y = make_data()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    directory = tmp_path / "parted"
    directory.mkdir()
    names = write_parts(str(directory), model)
    return directory, names, model


def test_inspect_and_verify_read_every_part(parted, capsys):
    directory, names, _ = parted
    code, out, err = run(capsys, "inspect", directory)
    assert code == 0, err
    assert "step 4, epoch 1, batch 2" in out
    assert f"parts:     2 (one per process of a multi-process job): " \
           f"{names[0]}, {names[1]}" in out
    assert "ok (every checksum verified)" in out
    # The first kernel (6 x 8) in two halves, one per part.
    assert re.search(r"model\.0:0 +\S+ +float32 +\(3, 8\) at \(0, 0\) of \(6, 8\)", out)
    assert re.search(r"model\.0:0 +\S+ +float32 +\(3, 8\) at \(3, 0\) of \(6, 8\)", out)
    code, out, err = run(capsys, "inspect", "--json", directory)
    [checkpoint] = json.loads(out)["checkpoints"]
    assert checkpoint["parts"] == names
    assert {"global_shape": [6, 8], "start": [3, 0]}.items() <= next(
        t for t in checkpoint["tensors"] if t["start"] == [3, 0]).items()
    code, out, err = run(capsys, "verify", directory)
    assert code == 0 and "1 checkpoint(s): 1 ok, 0 damaged" in out


@pytest.mark.parametrize("damage, reason", [
    ("flip", "checksum mismatch in tensor"),
    ("remove", "a part it names is missing"),
])
def test_verify_finds_a_damaged_or_missing_part(parted, capsys, damage, reason):
    directory, names, _ = parted
    part = os.path.join(directory, names[1])
    if damage == "flip":
        flip_byte(part, fmt.ALIGNMENT + 8)
    else:
        os.unlink(part)
    code, out, err = run(capsys, "verify", directory)
    assert code == 1
    assert "1 checkpoint(s): 0 ok, 1 damaged" in out
    assert reason in out


def test_export_assembles_the_parts(parted, tmp_path, capsys, factory):
    directory, _, model = parted
    out_file = tmp_path / "out.weights.h5"
    code, out, err = run(capsys, "export", directory, out_file,
                         "--model-factory", f"{factory}:build")
    assert code == 0, err
    assert "exported ckpt-000000000004.fbk (step 4, epoch 1, batch 2" in out
    saved = {name: np.array(v.numpy()) for name, v in collect_variables(model)}
    for name, path, value in loaded_state(out_file):
        if name.startswith("metrics.") or "seed_generator" in path:
            continue
        assert value.tobytes() == saved[name].tobytes(), name


def test_export_hint_restores_the_optimizer_state_when_followed(backup, tmp_path,
                                                                capsys):
    import h5py

    out_file = tmp_path / "out.weights.h5"
    code, out, err = run(capsys, "export", backup, out_file)
    assert code == 0, err
    lines = out.splitlines()
    # The counts are of what the file holds, counted here independently.
    with h5py.File(out_file, "r") as f:
        names: list[str] = []
        f.visititems(lambda name, item: names.append(name)
                     if isinstance(item, h5py.Dataset) else None)
    optimizer = sum(name.startswith("optimizer/") for name in names)
    assert lines[0] == (
        f"exported ckpt-000000000001.fbk (step 1, epoch 2, batch 0) to "
        f"{out_file}: {len(names)} arrays, {len(names) - optimizer} of the "
        f"model and {optimizer} of the optimizer (a Keras weights file holds "
        "no seed generator or metric state)")
    assert (len(names), optimizer) == (9 - 1 + 14, 14)
    # The hint, followed to the letter in a model built and compiled as in
    # training, its optimizer not built (as after `compile`).
    code_lines = [line.strip() for line in lines if line.startswith("    ")]
    assert code_lines[-1] == "model.fit(..., initial_epoch=2)"
    model = make_model()
    assert not model.optimizer.built
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The printed hint is the code under test: run as a user would.
        exec("\n".join(code_lines[:-1]), {"model": model})  # noqa: S102
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    expected = read_checkpoint(checkpoint_path(backup, 1))
    compared = 0
    for name, variable in collect_variables(model):
        if name.startswith("metrics.") or "seed_generator" in variable.path:
            continue
        assert np.array(variable.numpy()).tobytes() == expected[name].tobytes(), name
        compared += 1
    assert compared == len(names)
    assert int(model.optimizer.iterations.numpy()) == int(expected["optimizer.0"]) > 0
