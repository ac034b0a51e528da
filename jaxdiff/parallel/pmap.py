"""Devices: the one place that knows how many there are.

Data parallelism with `jax.pmap`: the state is replicated on every local device (a leading
device axis), each global batch is split into one slice per device, and the pmapped function
averages gradients with `lax.pmean` over `AXIS`. Joining a multi-host run, and which process
writes, is `jaxdiff.parallel.distributed`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError

AXIS = "batch"  # the pmap axis name that train steps reduce over

PyTree = Any


def device_count() -> int:
    """Local devices the pmapped functions run on."""
    return jax.local_device_count()


def replicate(tree: PyTree) -> PyTree:
    """Put one copy of every leaf on each local device (leading axis = devices)."""
    devices = jax.local_devices()
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                          jax.sharding.PartitionSpec(AXIS))
    return jax.tree.map(
        lambda x: jax.make_array_from_single_device_arrays(
            (len(devices),) + np.shape(x), sharding,
            [jax.device_put(jnp.asarray(x)[None], d) for d in devices]), tree)


def unreplicate(tree: PyTree) -> PyTree:
    """The first device's copy of a replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)


def host_copy(tree: PyTree) -> PyTree:
    """Device 0's replica of a replicated (pmapped) tree, as host numpy arrays: read straight
    from that device's buffers (indexing the replicated arrays would run a gather per leaf)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), tree)


def shard(tree: PyTree, num_devices: int | None = None) -> PyTree:
    """Split the leading (batch) axis of every leaf into ``(devices, batch // devices, ...)``."""
    n = num_devices or device_count()

    def split(x):
        if x.shape[0] % n:
            raise JaxdiffError(f"batch of {x.shape[0]} does not split evenly over {n} devices; "
                               f"use a batch size divisible by {n}")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(split, tree)


def unshard(tree: PyTree) -> PyTree:
    """Inverse of `shard`: ``(devices, b, ...)`` → ``(devices * b, ...)``."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)


def gather(tree: PyTree) -> PyTree:
    """Per-device results as one host numpy batch."""
    return jax.tree.map(np.asarray, unshard(jax.device_get(tree)))


def example_keys(key: jax.Array, local_batch: int, axis_name: str | None = AXIS,
                 index: jax.Array | None = None) -> jax.Array:
    """One PRNG key per example, keyed by its index in the *global* batch, so the random draws
    of an example do not depend on how many devices share the batch. Inside `pmap` over
    `axis_name`; with `axis_name=None` the batch is all on one device (or one global array).
    `index` (local_batch,): the examples' global indices when they are not consecutive (a
    micro-batch of gradient accumulation)."""
    if index is not None:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local_batch
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(local_batch))


def pmap(fn: Callable, *, donate_state: bool = True, **kwargs) -> Callable:
    """`jax.pmap` over `AXIS`; the first argument (the state) is donated by default."""
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate_state else (), **kwargs)
