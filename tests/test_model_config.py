"""Tests of `fastbackup.model_config`: the architecture stored for `export`."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from fastbackup import model_config
from fastbackup.stores.local import LocalStore
from fastbackup.stores.names import MAX_OBJECT_BYTES, MODEL_CONFIG_NAME
from tests.conftest import make_model


@keras.saving.register_keras_serializable(package="fastbackup_tests")
class RegisteredModel(keras.Model):
    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class PlainSubclass(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def roundtrip(model):
    data, reason = model_config.describe(model)
    document = model_config.parse(data, model_config.checksum(data), "f")
    assert document["reason"] == reason
    return data, reason is None, document


def test_sequential_round_trips_with_its_compile_config():
    model = make_model()
    data, stored, document = roundtrip(model)
    assert stored and document["class_name"] == "Sequential"
    assert document["keras_version"] == keras.__version__
    assert document["backend"] == keras.backend.backend()
    rebuilt = model_config.rebuild(document, "f")
    assert rebuilt.built and rebuilt.optimizer is not None
    assert type(rebuilt.optimizer).__name__ == type(model.optimizer).__name__
    assert [tuple(v.shape) for v in rebuilt.weights] == [
        tuple(v.shape) for v in model.weights
    ]


def test_registered_subclass_is_stored_and_rebuilt():
    model = RegisteredModel(units=5)
    model.compile(optimizer="sgd", loss="mse")
    model(np.ones((1, 4), "float32"))
    _, stored, document = roundtrip(model)
    assert stored
    rebuilt = model_config.rebuild(document, "f")
    assert isinstance(rebuilt, RegisteredModel) and rebuilt.units == 5


def test_unregistered_subclass_is_not_stored_and_says_why():
    model = PlainSubclass()
    model(np.ones((1, 4), "float32"))
    data, stored, document = roundtrip(model)
    assert not stored and document["config"] is None
    assert "PlainSubclass is a subclassed model" in document["reason"]
    with pytest.raises(model_config.ModelConfigError, match="not stored"):
        model_config.rebuild(document, "f")


def test_parse_refuses_a_config_the_checkpoint_does_not_vouch_for():
    data, _ = model_config.describe(make_model())
    crc = model_config.checksum(data)
    with pytest.raises(model_config.ModelConfigError,
                       match="records no model config"):
        model_config.parse(data, None, "f")
    with pytest.raises(model_config.ModelConfigError,
                       match="does not belong to this checkpoint"):
        model_config.parse(data + b" ", crc, "f")
    other = json.dumps({"format": 99}).encode()
    with pytest.raises(model_config.ModelConfigError, match="unsupported"):
        model_config.parse(other, model_config.checksum(other), "f")


def test_rebuild_refuses_an_unknown_class():
    document = {"format": 1, "class_name": "Nope",
                "config": {"class_name": "NoSuchModel", "config": {},
                           "module": None, "registered_name": "NoSuchModel"}}
    with pytest.raises(model_config.ModelConfigError,
                       match="Keras cannot rebuild 'Nope'"):
        model_config.rebuild(document, "f")


def test_storage_writes_and_reads_it_atomically(tmp_path):
    store = LocalStore(tmp_path)
    assert store.read_object(MODEL_CONFIG_NAME) is None
    store.write_object(MODEL_CONFIG_NAME, b"{}")
    store.write_object(MODEL_CONFIG_NAME, b'{"a": 1}')
    assert store.read_object(MODEL_CONFIG_NAME) == b'{"a": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        MODEL_CONFIG_NAME
    ]


def test_a_killed_writer_s_temp_file_is_cleaned(tmp_path):
    leftover = tmp_path / f".{MODEL_CONFIG_NAME}.0123456789abcdef.tmp"
    leftover.write_bytes(b"{")
    assert LocalStore(str(tmp_path)).remove_temp_files() == [str(leftover)]


def test_storage_refuses_an_oversized_file(tmp_path):
    with open(tmp_path / MODEL_CONFIG_NAME, "wb") as f:
        f.truncate(MAX_OBJECT_BYTES + 1)
    with pytest.raises(ValueError, match="not an object fastbackup wrote"):
        LocalStore(tmp_path).read_object(MODEL_CONFIG_NAME)
