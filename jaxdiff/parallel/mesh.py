"""Devices at scale: `jit` over a `Mesh` with axes ``data`` and ``fsdp``, and the one rule that
decides how each array is laid out on it.

    mesh = make_mesh(parse_mesh("data=2,fsdp=4"))            # default: every device on `data`
    state_sh = state_shardings(state, mesh)                  # the rule, leaf by leaf
    state = place(state, state_sh)
    step = jax.jit(train_step, in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                   donate_argnums=0)
    state, metrics = step(state, global_batch(mesh, host_batch))

The rule (`spec_for`): an array is split over the ``fsdp`` axis along its largest dimension
divisible by the axis size (the last such when several tie) and replicated when none is (or
fsdp is 1); the train state's step counter and PRNG key are always replicated. Batches are split
along their first dimension over every device (``data`` × ``fsdp``: each device computes its own
examples, as in ZeRO-3/FSDP). Gradients are reduced and parameters gathered by XLA, not by hand.
The mesh spans every device of every host (`jax.devices()`); each host contributes its own rows
of a global batch (`global_batch`, `jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.errors import JaxdiffError

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
BATCH = PartitionSpec((DATA, FSDP))  # the first dimension over every device
REPLICATED = PartitionSpec()

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """`data` × `fsdp` devices; `data` None: every device not on `fsdp`."""

    data: int | None = None
    fsdp: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int]:
        """(data, fsdp) for `num_devices` devices, checked."""
        if self.fsdp < 1 or (self.data is not None and self.data < 1):
            raise JaxdiffError(f"--mesh sizes must be positive, got data={self.data}, fsdp={self.fsdp}")
        data = self.data if self.data is not None else num_devices // self.fsdp
        if data * self.fsdp != num_devices:
            raise JaxdiffError(f"--mesh data={data},fsdp={self.fsdp} needs {data * self.fsdp} devices but the "
                               f"run has {num_devices}; make data x fsdp = {num_devices} (or leave data out)")
        return data, self.fsdp

    def __str__(self) -> str:
        return f"data={'auto' if self.data is None else self.data},fsdp={self.fsdp}"


def parse_mesh(text: str | None) -> MeshShape:
    """``"data=D,fsdp=F"`` (either part may be left out; ``""``/None: every device on data)."""
    if text is None or not text.strip():
        return MeshShape()
    sizes = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if not m or m.group(1) not in AXES or m.group(1) in sizes:
            raise JaxdiffError(f"--mesh {text!r}: write data=D,fsdp=F (axes {', '.join(AXES)}, each once, "
                               "positive integers), e.g. --mesh data=2,fsdp=4")
        sizes[m.group(1)] = int(m.group(2))
    shape = MeshShape(sizes.get(DATA), sizes.get(FSDP, 1))
    if shape.fsdp < 1 or (shape.data is not None and shape.data < 1):
        raise JaxdiffError(f"--mesh {text!r}: sizes must be positive")
    return shape


def make_mesh(shape: MeshShape | str | None = None, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: every device of every host, process 0's
    first, so that each host's devices hold consecutive rows of a batch)."""
    if not isinstance(shape, MeshShape):
        shape = parse_mesh(shape)
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = shape.resolve(len(devices))
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices, dtype=object).reshape(data, fsdp), AXES)


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------

def spec_for(shape: tuple, fsdp: int) -> PartitionSpec:
    """Split over `fsdp` along the largest dimension divisible by it (the last of equals);
    replicated when no dimension is (or `fsdp` is 1)."""
    if fsdp <= 1:
        return REPLICATED
    dims = [i for i, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
    if not dims:
        return REPLICATED
    axis = max(dims, key=lambda i: (shape[i], i))
    return PartitionSpec(*([None] * axis + [FSDP]))


def shardings(tree: PyTree, mesh: Mesh) -> PyTree:
    """`NamedSharding` of every leaf of `tree` (arrays or ShapeDtypeStructs) by `spec_for`."""
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(np.shape(x), fsdp)), tree)


def state_shardings(state, mesh: Mesh):
    """`shardings` of a `TrainState`: params, optimizer moments and EMA by the rule; the step
    counter and PRNG key replicated."""
    replicated = NamedSharding(mesh, REPLICATED)
    return shardings(state, mesh).replace(step=replicated, rng=replicated)


def replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    return jax.tree.map(lambda _: NamedSharding(mesh, REPLICATED), tree)


def split_rows(tree: PyTree, mesh: Mesh, what: str = "images") -> PyTree:
    """Every array of `tree` (leading dimension B, the same for all) split along B over all of
    `mesh`'s devices (one process); None leaves stay None. Sampling programs use it to run one
    `jit` program on N devices without `pmap` or hand-replicated inputs."""
    n = mesh.devices.size
    for x in jax.tree.leaves(tree):
        if np.ndim(x) == 0 or np.shape(x)[0] % n:
            raise JaxdiffError(f"{np.shape(x)[0] if np.ndim(x) else 1} {what} do not split evenly over "
                               f"the mesh's {n} devices; use a multiple of {n}")
    rows = NamedSharding(mesh, BATCH)
    return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), rows), tree)


def place(tree: PyTree, sharding: PyTree) -> PyTree:
    """Host (or device) arrays, the same on every process, laid out as `sharding` (a tree of
    shardings like `tree`); each process writes only its own devices' pieces. Always new
    buffers, so a step that donates the result leaves `tree` intact."""
    def put(x, s):
        if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(jnp.copy(x), s)  # (device_put alone may reuse x's buffer on one device)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, sharding)


def global_batch(mesh: Mesh, local: PyTree) -> PyTree:
    """This process's rows of a global batch (every leaf (b_local, ...)) as global arrays split
    over every device along the first dimension (`jax.make_array_from_process_local_data`)."""
    sharding = NamedSharding(mesh, BATCH)
    n = mesh.devices.size

    def make(x):
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count()
        if rows % n:
            raise JaxdiffError(f"a batch of {rows} does not split over the mesh's {n} devices; "
                               f"use a batch size divisible by {n}")
        return jax.make_array_from_process_local_data(sharding, x, (rows,) + x.shape[1:])

    return jax.tree.map(make, local)


def host_copy(tree: PyTree) -> PyTree:
    """Every leaf as one host numpy array: a replicated array read from one local device, a
    split one gathered (across hosts too: then every process must call this)."""
    def local(x):
        return np.asarray(x.addressable_data(0)) if x.sharding.is_fully_replicated else np.asarray(x)

    if all(x.sharding.is_fully_replicated for x in jax.tree.leaves(tree)) or jax.process_count() == 1:
        return jax.tree.map(local, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# --------------------------------------------------------------------------------------------
# What each device holds
# --------------------------------------------------------------------------------------------

def device_bytes(tree: PyTree) -> dict:
    """{device: bytes} of the shards of `tree`'s arrays that each (addressable) device holds."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def _path(keys) -> str:
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in keys)


def sharding_table(tree: PyTree, mesh: Mesh, *, limit: int | None = None) -> str:
    """A printable table: each array's path, shape, dtype, how it is split and the bytes one
    device holds; with totals. `limit`: at most this many rows (the largest arrays first)."""
    fsdp = mesh.shape[FSDP]
    rows, total, per_device = [], 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
        spec = spec_for(shape, fsdp)
        nbytes = math.prod(shape) * dtype.itemsize
        mine = nbytes // fsdp if spec != REPLICATED else nbytes
        total, per_device = total + nbytes, per_device + mine
        split = "replicated" if spec == REPLICATED else f"dim {list(spec).index(FSDP)} / {fsdp}"
        rows.append((nbytes, _path(path), str(shape), dtype.name, split, mine))
    rows.sort(key=lambda r: -r[0])
    shown = rows[:limit] if limit else rows
    width = max([len(r[1]) for r in shown] + [5])
    lines = [f"mesh data={mesh.shape[DATA]} x fsdp={fsdp}: {len(rows)} arrays, "
             f"{total / 2**20:.1f} MiB in all, {per_device / 2**20:.1f} MiB per device",
             f"{'array':<{width}}  {'shape':<22} {'dtype':<9} {'split':<12} per device"]
    lines += [f"{p:<{width}}  {s:<22} {d:<9} {sp:<12} {m / 2**10:,.1f} KiB" for _, p, s, d, sp, m in shown]
    if limit and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} smaller arrays")
    return "\n".join(lines)
