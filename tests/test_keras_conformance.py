"""Keras's own tests of its callback, run against `fastbackup.BackupAndRestore`.

The test file is the one inside the installed keras wheel
(`keras/src/callbacks/backup_and_restore_test.py`), read at collection
time, so it follows whichever Keras is installed; nothing of it is copied
here and none of its assertions is changed. The one change: once the
module is loaded, its global `callbacks` (the `keras.src.callbacks`
package, used as `callbacks.BackupAndRestore(...)`) is replaced by a view
of that package whose `BackupAndRestore` is fastbackup's. Every other name
(`callbacks.Callback` included) is Keras's own.

A missing or renamed file fails collection loudly: this suite is the
evidence for the "same as Keras" rows of docs/migrating.md.
"""

from __future__ import annotations

import importlib.util
import os
import types
import warnings

import keras
import pytest

import fastbackup

KERAS_TEST_FILE = os.path.join(
    os.path.dirname(keras.__file__), "src", "callbacks",
    "backup_and_restore_test.py",
)
KERAS_TEST_CLASS = "BackupAndRestoreCallbackTest"

# Keras's tests that read Keras's private file layout, which fastbackup does
# not have (one `ckpt-<step>.fbk` per checkpoint instead of
# `latest.weights.h5` + `training_metadata.json` and their `.bkp` copies).
# Each is left out by name; the behaviour it checks is covered by the test
# of ours named beside it.
DESELECTED = {
    # Reads `_weights_path`, `_training_metadata_path`, `_prev_weights_path`
    # and `_prev_training_metadata_path`, and damages `_weights_path`: with
    # `double_checkpoint=True` the previous checkpoint is restored and
    # training goes on to the last epoch.
    "test_backup_corrupted": (
        "tests/test_callback.py::"
        "test_double_checkpoint_restores_previous_when_newest_damaged"
    ),
}


def _load_keras_tests() -> types.ModuleType:
    if not os.path.isfile(KERAS_TEST_FILE):
        raise FileNotFoundError(
            f"Keras's test file {KERAS_TEST_FILE} is not in the installed "
            f"keras {keras.__version__}; the conformance suite cannot run"
        )
    spec = importlib.util.spec_from_file_location(
        "keras_backup_and_restore_test", KERAS_TEST_FILE
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        # `requires_trainable_backend` is registered by Keras's own
        # conftest, which the wheel does not ship. It skips on the numpy
        # backend only; every backend this suite runs under trains.
        warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(module)
    keras_callbacks = module.callbacks
    swapped = types.ModuleType(keras_callbacks.__name__)
    swapped.__dict__.update(vars(keras_callbacks))
    swapped.BackupAndRestore = fastbackup.BackupAndRestore
    module.callbacks = swapped
    return module


_keras_tests = _load_keras_tests()


def _keras_test_names() -> list[str]:
    case = getattr(_keras_tests, KERAS_TEST_CLASS)
    return sorted(n for n in dir(case) if n.startswith("test"))


# Collected by pytest as a unittest case (Keras's own class is not a global
# here, so it is not collected as well); its methods run with the loaded
# module's globals, hence with the swapped `callbacks`.
# The names in DESELECTED are deselected at collection (tests/conftest.py,
# `pytest_collection_modifyitems`): pytest's summary counts them.
KerasBackupAndRestoreTest = type(
    "KerasBackupAndRestoreTest",
    (getattr(_keras_tests, KERAS_TEST_CLASS),),
    {},
)


def test_keras_tests_run_against_fastbackup():
    assert _keras_tests.callbacks.BackupAndRestore is fastbackup.BackupAndRestore
    # Only the class is swapped: the package Keras's tests see is Keras's.
    assert _keras_tests.callbacks.Callback is keras.callbacks.Callback
    # Keras 3.15 ships 7 tests; fewer means the file changed under us.
    assert len(_keras_test_names()) >= 7, _keras_test_names()


def test_each_deselected_keras_test_exists_and_is_covered():
    names = _keras_test_names()
    for name, covered_by in DESELECTED.items():
        # A deselection outliving its test would hide nothing, silently.
        assert name in names, f"{name} is no longer in {KERAS_TEST_FILE}"
        path, _, function = covered_by.partition("::")
        root = os.path.dirname(os.path.dirname(__file__))
        with open(os.path.join(root, path)) as f:
            assert f"def {function}(" in f.read(), covered_by
