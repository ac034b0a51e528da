"""Devices: the one package that knows how many there are. `pmap` helpers (replicate, shard,
gather) in `jaxdiff.parallel.pmap`, re-exported here; multi-host start-up and which process
writes in `jaxdiff.parallel.distributed`."""
from jaxdiff.parallel.pmap import (AXIS, device_count, example_keys, gather, host_copy, pmap,
                                   replicate, shard, unreplicate, unshard)

__all__ = ["AXIS", "device_count", "example_keys", "gather", "host_copy", "pmap", "replicate",
           "shard", "unreplicate", "unshard"]
