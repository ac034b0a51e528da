"""Devices: the one package that knows how many there are. The training engines in
`jaxdiff.parallel.engine` (`MeshEngine`, the default: `jit` over a (data, fsdp) mesh with the one
sharding rule of `jaxdiff.parallel.mesh`; `PmapEngine`); `pmap` helpers (replicate, shard,
gather) in `jaxdiff.parallel.pmap`, re-exported here; multi-host start-up and which process
writes in `jaxdiff.parallel.distributed`."""
from jaxdiff.parallel.pmap import (AXIS, device_count, example_keys, gather, host_copy, pmap,
                                   replicate, shard, unreplicate, unshard)

__all__ = ["AXIS", "device_count", "example_keys", "gather", "host_copy", "pmap", "replicate",
           "shard", "unreplicate", "unshard"]
