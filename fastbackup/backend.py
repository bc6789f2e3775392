"""Everything that differs between Keras's backends, in one place.

Each backend is one class; `current()` picks the one of
`keras.backend.backend()`, once. The rest of fastbackup asks it what it
needs (how to read a variable into host memory, which shards this process
holds, how a train step consumes its batches, how to hold an optimizer
update) and never branches on the backend's name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

# (client, process index, process count) of a multi-process job.
Job = tuple[Any, int, int]

# A region of a variable: its start and its shape.
Region = tuple[tuple[int, ...], tuple[int, ...]]


def region_of(index: tuple[Any, ...] | None, shape: tuple[int, ...]) -> Region:
    """The region of a variable of `shape` that a sharding's index selects.

    Args:
        index: a tuple of slices, one per leading dimension (missing ones
            take the whole dimension), as a JAX sharding's
            `devices_indices_map` gives; `None` for the whole variable.
        shape: the variable's shape.

    Returns:
        `(start, size)`, each a tuple of one int per dimension.
    """
    start, size = [], []
    for dim, n in enumerate(shape):
        sl = index[dim] if index is not None and dim < len(index) else slice(None)
        lo, hi, _ = sl.indices(n)
        start.append(lo)
        size.append(hi - lo)
    return tuple(start), tuple(size)


class Backend:
    """The behaviour every backend shares; subclasses override what differs.

    Attributes:
        name: Keras's name of the backend.
        end_of_data: the exceptions that end an iterator of batches.
        retraces_for_gate: the train step is traced once, so a gate on the
            optimizer's update is in it only if the step is traced again
            (`overlap.UpdateGate`).
        copies_mapped_views: `variable.assign` may alias a host array, so a
            read-only view of a mapped file must be copied first.
    """

    name = ""
    end_of_data: tuple[type[BaseException], ...] = (StopIteration,)
    retraces_for_gate = False
    copies_mapped_views = False

    def read_host(self, variable: Any) -> np.ndarray:
        """A host array of `variable`'s value, a view wherever possible."""
        # A JAX array is immutable, so its view is consistent by construction.
        return np.asarray(variable.value)

    def job(self) -> Job | None:
        """The coordination client of a multi-process job, else `None`."""
        return None

    def process_part(self) -> tuple[int, int] | None:
        """`(process index, process count)` where a process holds only part
        of the state (a multi-process job), else `None`."""
        return None

    def local_shards(self, variable: Any) -> tuple[Any, list[tuple[Any, ...]]] | None:
        """The sharding and the indices of the pieces this process holds of
        `variable`, or `None` where it takes a whole host array."""
        return None

    def written_regions(self, variable: Any) -> list[Region] | None:
        """The regions of `variable` this process writes in a multi-process
        job, or `None` where the variable is one whole array in every
        process (written once, by process 0)."""
        return None

    def read_region(self, variable: Any, region: Region) -> np.ndarray:
        """A host array of this process's copy of `region` of `variable`.

        Raises:
            RuntimeError: this process holds no such region any more.
        """
        raise NotImplementedError(f"{self.name} variables are not sharded")

    def assign_shards(
        self, variable: Any, sharding: Any,
        piece: Callable[[tuple[Any, ...]], np.ndarray],
    ) -> None:
        """Assigns the array whose piece at each index is `piece(index)`."""
        raise NotImplementedError(f"{self.name} variables are not sharded")

    def skip_step(
        self, args: tuple[Any, ...], steps: int,
        seen: Callable[[Any], None] | None = None,
    ) -> Any:
        """Consumes the `steps` batches a train-function call would, without
        training, and returns what the fit loop expects of the call.

        `seen`, when given, is called with each batch consumed.
        """
        # The train function pulls its batches from the iterator it is given.
        for _ in range(steps):
            try:
                batch = next(args[0])
            except self.end_of_data:
                break
            if seen is not None:
                seen(batch)
        return {}

    def overlap_obstacle(self, model: Any) -> str | None:
        """Why an update of `model` cannot wait behind a background copy
        (`overlap`), as far as the backend is concerned."""
        return (
            f"the {self.name} trainer donates the training state to each "
            "step, so it cannot be read behind the step"
        )

    def on_host(self, variable: Any) -> bool:
        """True if `variable` lives in host memory."""
        return False

    def gated_apply(
        self, apply: Callable[..., Any], hold: Callable[[], None]
    ) -> Callable[..., Any]:
        """`apply` made to call `hold` before it updates anything."""

        @functools.wraps(apply)
        def gated(*args: Any, **kwargs: Any) -> Any:
            hold()
            return apply(*args, **kwargs)

        return gated


class TensorFlow(Backend):
    name = "tensorflow"
    retraces_for_gate = True

    def __init__(self) -> None:
        import tensorflow as tf

        self.end_of_data = (StopIteration, tf.errors.OutOfRangeError)

    def read_host(self, variable: Any) -> np.ndarray:
        # `read_value()` aliases the variable's buffer and `np.asarray` of an
        # eager CPU tensor is a view: one copy in all, done by `copyto`.
        tensor = variable.value.read_value()
        if tensor.shape.rank == 0:
            # TensorFlow cannot expose a 0-d bfloat16 tensor as an array; a
            # scalar costs nothing to copy whatever its dtype.
            return np.asarray(tensor.numpy())
        return np.asarray(tensor)

    def overlap_obstacle(self, model: Any) -> str | None:
        return None

    def on_host(self, variable: Any) -> bool:
        import tensorflow as tf

        device = tf.DeviceSpec.from_string(variable.value.device or "")
        return device.device_type in (None, "CPU")

    def gated_apply(
        self, apply: Callable[..., Any], hold: Callable[[], None]
    ) -> Callable[..., Any]:
        import tensorflow as tf

        def hold_op() -> Any:
            hold()
            return True

        @functools.wraps(apply)
        def gated(grads: Any, trainable_variables: Any = None) -> Any:
            if not tf.inside_function():
                hold()
                return apply(grads, trainable_variables)
            # The gate runs once the gradients exist: run earlier, it would
            # hold one of TensorFlow's inter-op threads through the forward
            # and backward passes.
            computed = [
                t for t in tf.nest.flatten(grads, expand_composites=True)
                if t is not None
            ]
            with tf.control_dependencies(computed):
                done = tf.numpy_function(
                    hold_op, [], tf.bool, stateful=True,
                    name="fastbackup_update_gate",
                )
            # Every op the update creates, reads included, runs after the
            # copy; the gradients are routed through it as well, so that
            # nothing of the update can be scheduled before.
            with tf.control_dependencies([done]):
                grads = [None if g is None else tf.identity(g) for g in grads]
                return apply(grads, trainable_variables)

        return gated


class Jax(Backend):
    name = "jax"
    copies_mapped_views = True

    def __init__(self) -> None:
        super().__init__()
        # (id of a sharding, region) -> (that sharding, position in
        # `addressable_data`); the sharding is kept so that its id is not
        # reused while the entry lives.
        self._positions: dict[tuple[int, Region], tuple[Any, int]] = {}

    def job(self) -> Job | None:
        import jax

        if jax.process_count() <= 1:
            return None
        from jax._src import distributed

        client = distributed.global_state.client
        if client is None:
            raise RuntimeError(
                "jax.process_count() is "
                f"{jax.process_count()} but JAX's distributed client is not "
                "initialised: call jax.distributed.initialize() (or "
                "keras.distribution.initialize()) before fit"
            )
        return client, jax.process_index(), jax.process_count()

    def process_part(self) -> tuple[int, int] | None:
        import jax

        count = jax.process_count()
        return (jax.process_index(), count) if count > 1 else None

    def local_shards(self, variable: Any) -> tuple[Any, list[tuple[Any, ...]]] | None:
        import jax

        if jax.process_count() == 1:
            # A single process assigns whole arrays: Keras places them.
            return None
        sharding = variable.value.sharding
        shape = tuple(int(d) for d in variable.shape)
        return sharding, list(
            sharding.addressable_devices_indices_map(shape).values()
        )

    def written_regions(self, variable: Any) -> list[Region] | None:
        # Which process writes which region is computed from the sharding
        # alone, never from the array's shards: `addressable_shards` raises
        # for an array Keras placed with `device_put` on a replicated
        # sharding while each process has one device ("the input arrays
        # must have one shard each"). Each distinct region is written once
        # in the job, by its first device in the sharding's global order,
        # the device JAX numbers replica 0 (`device_replica_id_map`), the
        # same in every process.
        import jax

        value = variable.value
        if not isinstance(value, jax.Array) or value.is_fully_addressable:
            return None
        shape = tuple(int(d) for d in variable.shape)
        sharding = value.sharding
        first: dict[Region, Any] = {}
        for device, index in sharding.devices_indices_map(shape).items():
            first.setdefault(region_of(index, shape), device)
        mine = sharding.addressable_devices
        return [
            region
            for region, device in sorted(first.items(), key=lambda i: i[1].id)
            if device in mine
        ]

    def read_region(self, variable: Any, region: Region) -> np.ndarray:
        # On the training thread at every save: which buffer holds `region`
        # is found once per sharding (18 us a region when searched, 1.5 us
        # when known, measured on a 4-device sharding).
        value = variable.value
        sharding = value.sharding
        # By identity: hashing a sharding costs more than the read.
        known = self._positions.get((id(sharding), region))
        if known is not None and known[0] is sharding:
            position = known[1]
        else:
            shape = tuple(int(d) for d in variable.shape)
            position = self._position(value, shape, region)
            self._positions[(id(sharding), region)] = (sharding, position)
        if position >= 0:
            return np.asarray(value.addressable_data(position))
        raise RuntimeError(
            f"variable {getattr(variable, 'path', variable)} has no region "
            f"at {region[0]} of shape {region[1]} in this process any more: "
            "its sharding changed during training"
        )

    @staticmethod
    def _position(value: Any, shape: tuple[int, ...], region: Region) -> int:
        """Which `addressable_data(i)` holds `region`; -1 if none does."""
        if value.is_fully_replicated:
            # Every device holds the whole array: JAX hands one replica.
            return 0 if region == region_of(None, shape) else -1
        # `addressable_data(i)` is one device's buffer (what JAX guarantees
        # for every array, unlike `addressable_shards`).
        indices = value.sharding.addressable_devices_indices_map(shape)
        for i in range(len(indices)):
            (device,) = value.addressable_data(i).devices()
            if region_of(indices[device], shape) == region:
                return i
        return -1

    def assign_shards(
        self, variable: Any, sharding: Any,
        piece: Callable[[tuple[Any, ...]], np.ndarray],
    ) -> None:
        import jax

        shape = tuple(int(d) for d in variable.shape)
        variable.assign(jax.make_array_from_callback(
            shape, sharding, piece))  # type: ignore[arg-type]

    def skip_step(
        self, args: tuple[Any, ...], steps: int,
        seen: Callable[[Any], None] | None = None,
    ) -> Any:
        # The train function takes (state, iterator) and returns
        # (logs, state): the state passes through untouched.
        super().skip_step(args[1:], steps, seen)
        return {}, args[0]


class Torch(Backend):
    name = "torch"

    def read_host(self, variable: Any) -> np.ndarray:
        tensor = variable.value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            # numpy has no bfloat16: reinterpret the bits as ml_dtypes' type.
            import ml_dtypes
            import torch

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def skip_step(
        self, args: tuple[Any, ...], steps: int,
        seen: Callable[[Any], None] | None = None,
    ) -> Any:
        # The loop already took this step's batch: it is the argument.
        if seen is not None and args:
            seen(args[0])
        return {}

    def overlap_obstacle(self, model: Any) -> str | None:
        return None

    def on_host(self, variable: Any) -> bool:
        return bool(variable.value.device.type == "cpu")


_BACKENDS: dict[str, type[Backend]] = {
    "tensorflow": TensorFlow, "jax": Jax, "torch": Torch,
}
_current: Backend | None = None


def current() -> Backend:
    """The backend Keras runs on (chosen once, at first use)."""
    global _current
    name = keras.backend.backend()
    if _current is None or _current.name != name:
        # Another backend (numpy, openvino) gets the shared behaviour.
        backend = _BACKENDS.get(name, Backend)()
        backend.name = name
        _current = backend
    return _current
