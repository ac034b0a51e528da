"""Reference implementations that tests and benchmarks compare jaxdiff against (they need the
test extras: torch, diffusers)."""
