"""How a training program's step runs on the devices: `MeshEngine` (the default: `jit` over a
(data, fsdp) mesh, state sharded by `jaxdiff.parallel.mesh`'s rule) or `PmapEngine` (`pmap`,
state replicated on every local device). A program builds its loss and step with
`engine.axis_name` and otherwise only calls the engine:

    engine = make_engine("mesh", "data=2,fsdp=4")
    step = engine.compile(make_train_step(loss_fn, tx, axis_name=engine.axis_name))
    state = engine.place_state(state)
    state, metrics = step(state, engine.place_batch(host_rows, shared={"encoders": frozen}))
    host_state = engine.host_copy(state)                      # numpy, for checkpoints and samples

Both give the compiled step's metrics as per-device copies (`metrics["loss"][0]` is the value).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from jaxdiff.errors import JaxdiffError

PyTree = Any
ENGINES = ("mesh", "pmap")


def _on_host(tree: PyTree) -> bool:
    """True when no leaf is a device array (a state already copied to the host)."""
    return not any(isinstance(x, jax.Array) for x in jax.tree.leaves(tree))


class PmapEngine:
    """`pmap` over the local devices: the state replicated, each batch split per device."""

    name = "pmap"

    def __init__(self):
        import importlib

        self._pmap = importlib.import_module("jaxdiff.parallel.pmap")  # the module (the package exports the function)
        self.axis_name = self._pmap.AXIS
        self._shared_cache: dict = {}

    def describe(self) -> str:
        return f"pmap over {jax.local_device_count()} local devices x {jax.process_count()} process(es)"

    def compile(self, train_step: Callable) -> Callable:
        return self._pmap.pmap(train_step)

    def place_state(self, state: PyTree) -> PyTree:
        return self._pmap.replicate(state)

    def replicate(self, tree: PyTree) -> PyTree:
        return self._pmap.replicate(tree)

    def place_batch(self, local: Mapping, shared: Mapping | None = None) -> dict:
        """This process's rows (b_local, ...) split over its devices; `shared` entries
        (replicated once and cached by identity) added as they are."""
        batch = self._pmap.shard(dict(local))
        for name, tree in (shared or {}).items():
            if self._shared_cache.get(name, (None,))[0] is not tree:
                self._shared_cache[name] = (tree, self._pmap.replicate(tree))
            batch[name] = self._shared_cache[name][1]
        return batch

    def host_copy(self, state: PyTree) -> PyTree:
        """Device 0's replica as host numpy arrays (a host state as it is)."""
        return state if _on_host(state) else self._pmap.host_copy(state)

    def copy_is_collective(self, state: PyTree) -> bool:
        return False


class MeshEngine:
    """`jit` over a (data, fsdp) mesh: params, optimizer moments and EMA split over `fsdp` by
    the rule, batches over every device, gradients reduced by XLA."""

    name = "mesh"
    axis_name = None

    def __init__(self, shape=None, devices=None):
        from jaxdiff.parallel import mesh

        self._m = mesh
        self.mesh = mesh.make_mesh(shape, devices)
        self._state_shardings = None
        self._shared_cache: dict = {}

    def describe(self) -> str:
        return (f"jit over a mesh data={self.mesh.shape['data']} x fsdp={self.mesh.shape['fsdp']} "
                f"({jax.process_count()} process(es))")

    def state_shardings(self, state: PyTree) -> PyTree:
        return self._m.state_shardings(state, self.mesh)

    def compile(self, train_step: Callable) -> Callable:
        """The step as one `jit` with the state's shardings in and out (the state donated); the
        batch keeps the sharding `place_batch` gave it. Metrics come out replicated, shape (1,)."""
        replicated = self._m.NamedSharding(self.mesh, self._m.REPLICATED)

        def step(state, batch):
            new_state, metrics = train_step(state, batch)
            return new_state, jax.tree.map(lambda x: x[None], metrics)

        def jitted(state):
            shardings = self._state_shardings or self.state_shardings(state)
            return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, replicated),
                           donate_argnums=0)

        cache: list = []

        def run(state, batch):
            if not cache:
                cache.append(jitted(state))
            return cache[0](state, batch)

        run.lower = lambda state, batch: jitted(state).lower(state, batch)
        return run

    def place_state(self, state: PyTree) -> PyTree:
        self._state_shardings = self.state_shardings(state)
        return self._m.place(state, self._state_shardings)

    def replicate(self, tree: PyTree) -> PyTree:
        return self._m.place(tree, self._m.replicated(tree, self.mesh))

    def place_batch(self, local: Mapping, shared: Mapping | None = None) -> dict:
        """This process's rows (b_local, ...) as global arrays over every device; `shared`
        entries replicated once (cached by identity)."""
        batch = self._m.global_batch(self.mesh, dict(local))
        for name, tree in (shared or {}).items():
            if self._shared_cache.get(name, (None,))[0] is not tree:
                self._shared_cache[name] = (tree, self.replicate(tree))
            batch[name] = self._shared_cache[name][1]
        return batch

    def host_copy(self, state: PyTree) -> PyTree:
        """The state as host numpy arrays. When some array is split across hosts this is a
        collective: every process must call it (`copy_is_collective`). A host state as it is."""
        return state if _on_host(state) else self._m.host_copy(state)

    def copy_is_collective(self, state: PyTree) -> bool:
        return jax.process_count() > 1 and not _on_host(state) and not all(
            x.sharding.is_fully_replicated for x in jax.tree.leaves(state))

    def table(self, state: PyTree, limit: int | None = 20) -> str:
        return self._m.sharding_table(state, self.mesh, limit=limit)


def make_engine(kind: str = "mesh", mesh: str | None = None):
    """The engine `--parallel kind` (and `--mesh`) ask for."""
    if kind == "pmap":
        if mesh:
            raise JaxdiffError("--mesh needs --parallel mesh (pmap replicates the state on every device)")
        return PmapEngine()
    if kind == "mesh":
        return MeshEngine(mesh)
    raise JaxdiffError(f"unknown --parallel {kind!r}; choose one of: {', '.join(ENGINES)}")
