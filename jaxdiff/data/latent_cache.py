"""A cache of VAE posteriors and text embeddings, computed once so training runs the UNet only
(`--cache-latents`).

    cache = LatentCache.build_or_open(folder, data, pipe, params, resolution=512, tokenize=tok,
                                      **sd_encoders(pipe))   # jaxdiff.training.text_to_image
    batch = cache.fetch(example_ids, caption_ids)   # {"moments": (b, 64, 64, 8), "context": (b, 77, 768), "index": (b,)}

The folder holds `meta.json` (what the cache was made from: data, model files, resolution,
dtype), `moments-*.npy` — the posterior's mean ‖ log-variance per image, so each step still
draws a fresh latent sample as on-the-fly training does — and `context-*.npy`, one text
embedding per distinct caption, plus `null.npy`, the empty prompt's embedding (caption
dropout). Arrays are memory-mapped: the cache may be larger than host memory.

A cache made from other data, another model or another resolution is rebuilt. It is written
into a temporary folder and renamed when complete, so an interrupted build leaves nothing half
made. With several processes the work is split between them (each encodes a contiguous part,
into its own files) when they share the folder's file system; otherwise each builds it all.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from jaxdiff.data.folder_lock import FolderLock
from jaxdiff.errors import JaxdiffError
from jaxdiff.parallel import distributed

FORMAT = "jaxdiff-latent-cache-1"
DTYPES = ("float16", "float32")


def _files_signature(folder: Path) -> list:
    """(name, size, mtime) of every file in a model component folder."""
    if not folder.is_dir():
        return []
    return sorted([str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
                  for p in folder.rglob("*") if p.is_file())


# The folders a cache entry is computed from (SDXL's second encoder and tokenizer when present, so
# SD caches keep their key).
ENCODER_COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def cache_key(data, pipe, resolution: int, dtype: str) -> dict:
    """What the cache depends on; a cache with another key is rebuilt."""
    model = pipe.folder
    return {
        "format": FORMAT,
        "data": data.local_fingerprint,
        "num_examples": len(data),
        "num_captions": len(data.caption_strings),
        "resolution": int(resolution),
        "dtype": dtype,
        "model": {c: _files_signature(Path(model) / c) for c in ENCODER_COMPONENTS
                  if c in ("vae", "text_encoder", "tokenizer") or (Path(model) / c).is_dir()}
        if model is not None else None,
    }


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class LatentCache:
    """Read side of a cache folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise JaxdiffError(f"latent cache {self.folder} cannot be read ({e}); delete it to rebuild") from None
        self._moments = self._open("moments", self.meta["moment_chunks"])
        self._context = self._open("context", self.meta["context_chunks"])
        self.null_context = np.load(self.folder / "null.npy")

    def _open(self, stem: str, chunks: list) -> list[tuple[int, int, np.ndarray]]:
        out = []
        for i, (start, end) in enumerate(chunks):
            path = self.folder / f"{stem}-{i:05d}.npy"
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise JaxdiffError(f"latent cache file {path} cannot be read ({e}); delete "
                                   f"{self.folder} to rebuild it") from None
            if arr.shape[0] != end - start:
                raise JaxdiffError(f"latent cache file {path} holds {arr.shape[0]} rows, expected "
                                   f"{end - start}; delete {self.folder} to rebuild it")
            out.append((start, end, arr))
        return out

    @staticmethod
    def _take(chunks, ids: np.ndarray) -> np.ndarray:
        starts = np.array([c[0] for c in chunks])
        which = np.searchsorted(starts, ids, side="right") - 1
        first = chunks[0][2]
        out = np.empty((len(ids),) + first.shape[1:], first.dtype)
        for c in np.unique(which):
            rows = which == c
            start, _, arr = chunks[c]
            local = ids[rows] - start
            order = np.argsort(local)  # sorted reads from the memory map
            got = np.empty((len(local),) + arr.shape[1:], arr.dtype)
            got[order] = arr[local[order]]
            out[rows] = got
        return out

    def __len__(self) -> int:
        return self._moments[-1][1]

    @property
    def latent_shape(self) -> tuple:
        return tuple(self._moments[0][2].shape[1:])

    def fetch(self, ids: np.ndarray, caption_ids: np.ndarray) -> dict:
        """The cached batch for `CaptionBatches`: moments of the examples `ids`, embeddings of
        the captions `caption_ids` (indices into the data's `caption_strings`)."""
        ids, caption_ids = np.asarray(ids, np.int64), np.asarray(caption_ids, np.int64)
        return {"moments": self._take(self._moments, ids), "context": self._take(self._context, caption_ids),
                "index": ids}

    # ------------------------------------------------------------------------------ building

    @classmethod
    def build_or_open(cls, folder: str | os.PathLike, data, pipe, params: dict, *, resolution: int,
                      tokenize: Callable, encode_images: Callable, encode_text: Callable,
                      dtype: str = "float16", batch_size: int = 16, workers: int = 4,
                      verbose: bool = True) -> "LatentCache":
        """Open the cache in `folder` if it was made from exactly this data, model, resolution
        and dtype; else (re)build it with the pipeline's VAE and text encoder:
        `encode_images(params["vae"], uint8 (b, R, R, 3)) -> moments (b, R/f, R/f, 2·C)` and
        `encode_text(params["text_encoder"], ids (b, L)) -> (b, L, D)`, both pmappable."""
        if dtype not in DTYPES:
            raise JaxdiffError(f"unknown cache dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        folder = Path(folder).expanduser().absolute()
        key = cache_key(data, pipe, resolution, dtype)
        if cls._matches(folder, key):
            if verbose:
                distributed.log(f"latent cache: reusing {folder}")
            return cls(folder)
        shared = _shared_filesystem(folder.parent)
        writer = distributed.is_main_process() or not shared
        # One builder per cache folder: a second run sharing it gets one error line instead of
        # deleting the first's half-built folder.
        def take_lock():
            return FolderLock(folder.parent, purpose="latent cache build", lock_name=f".{folder.name}.lock",
                              hint=", or give this run its own --cache-dir").acquire()

        lock = distributed.on_main_process(take_lock, "locking the latent cache") if shared else take_lock()
        try:
            if lock is not None and cls._matches(folder, key):  # built while we waited for the lock
                return cls(folder)
            return cls._build(folder, key, data, pipe, params, shared, writer, resolution, tokenize,
                              (encode_images, encode_text), dtype, batch_size, workers, verbose)
        finally:
            if lock is not None:
                lock.release()

    @classmethod
    def _build(cls, folder, key, data, pipe, params, shared, writer, resolution, tokenize, encoders,
               dtype, batch_size, workers, verbose) -> "LatentCache":
        parts = distributed.process_count() if shared else 1
        mine = distributed.process_index() if shared else 0
        tmp = folder.with_name(f".{folder.name}.building")
        if writer:
            if folder.exists():
                cls._remove_old(folder, verbose)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.sync("latent-cache-start")
        moment_chunks = _chunks(len(data), parts)
        context_chunks = _chunks(len(data.caption_strings), parts)
        t0 = time.perf_counter()
        _encode_part(tmp, data, pipe, params, encoders, resolution, tokenize,
                     np.dtype(dtype), batch_size, workers,
                     mine if shared else None, moment_chunks if shared else [(0, len(data))],
                     context_chunks if shared else [(0, len(data.caption_strings))], verbose)
        distributed.sync("latent-cache-encoded")
        if writer:
            meta = {**key, "moment_chunks": moment_chunks if shared else [(0, len(data))],
                    "context_chunks": context_chunks if shared else [(0, len(data.caption_strings))],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "seconds": round(time.perf_counter() - t0, 2)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            os.replace(tmp, folder)
        distributed.sync("latent-cache-done")
        if verbose:
            distributed.log(f"latent cache: {len(data)} images and {len(data.caption_strings)} captions "
                            f"encoded in {time.perf_counter() - t0:.1f} s into {folder}")
        return cls(folder)

    @staticmethod
    def _matches(folder: Path, key: dict) -> bool:
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return all(json.loads(json.dumps(meta.get(k))) == json.loads(json.dumps(v)) for k, v in key.items())

    @staticmethod
    def _remove_old(folder: Path, verbose: bool) -> None:
        meta = folder / "meta.json"
        is_cache = False
        if meta.is_file():
            try:
                is_cache = json.loads(meta.read_text()).get("format", "").startswith("jaxdiff-latent-cache")
            except (OSError, json.JSONDecodeError, AttributeError):
                is_cache = False
        if not is_cache and any(folder.iterdir()):
            raise JaxdiffError(f"{folder} exists and is not a jaxdiff latent cache; choose another --cache-dir")
        if verbose:
            print(f"latent cache: {folder} was made from other data, model or settings; rebuilding it",
                  file=sys.stderr)
        shutil.rmtree(folder)


def _shared_filesystem(parent: Path) -> bool:
    """True when every process sees the same `parent` folder (always true for one process)."""
    if distributed.process_count() == 1:
        return True
    parent.mkdir(parents=True, exist_ok=True)
    token = distributed.broadcast_from_main(np.frombuffer(uuid.uuid4().bytes, np.uint8).copy())
    probe = parent / f".shared-probe-{bytes(token).hex()}"
    if distributed.is_main_process():
        probe.touch()
    distributed.sync("latent-cache-probe")
    from jax.experimental import multihost_utils

    seen = np.asarray(multihost_utils.process_allgather(np.array([probe.exists()], np.int32)))
    distributed.sync("latent-cache-probe-read")
    if distributed.is_main_process():
        probe.unlink(missing_ok=True)
    return bool(seen.all())


def _encode_part(tmp: Path, data, pipe, params, encoders, resolution, tokenize, dtype, batch_size, workers,
                 part: Optional[int], moment_chunks, context_chunks, verbose) -> None:
    """Encode this process's chunks (all of them when `part` is None) into `tmp`."""
    import concurrent.futures

    import jax
    from tqdm import tqdm

    from jaxdiff import parallel
    from jaxdiff.data.captions import prepare_image

    n_dev = parallel.device_count()
    per_call = -(-batch_size // n_dev) * n_dev
    vae_p = parallel.replicate(params["vae"])
    te_p = parallel.replicate(params["text_encoder"])
    enc_images, enc_text = (jax.pmap(fn) for fn in encoders)

    def run(fn, p, inputs):
        n = len(inputs)
        padded = np.concatenate([inputs, np.repeat(inputs[-1:], per_call - n, 0)]) if n < per_call else inputs
        out = fn(p, padded.reshape((n_dev, -1) + padded.shape[1:]))
        return np.asarray(out).reshape((per_call,) + out.shape[2:])[:n]

    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    which = range(len(moment_chunks)) if part is None else [part]
    for c in which:
        start, end = moment_chunks[c]
        h = resolution // pipe.vae_scale_factor
        shape = (end - start, h, h, 2 * pipe.vae.config.latent_channels)
        out = np.lib.format.open_memmap(tmp / f"moments-{c:05d}.npy", "w+", dtype, shape)
        bar = tqdm(total=end - start, desc="caching latents", unit="img", file=sys.stderr,
                   disable=not verbose or not distributed.is_main_process())
        for s in range(start, end, per_call):
            ids = range(s, min(end, s + per_call))
            pixels = np.stack(list(pool.map(lambda i: prepare_image(data.image(i), resolution), ids)))
            out[s - start:s - start + len(ids)] = run(enc_images, vae_p, pixels).astype(dtype)
            bar.update(len(ids))
        bar.close()
        out.flush()
        del out
        start, end = context_chunks[c]
        strings = data.caption_strings[start:end]
        ctx = None
        for s in range(0, len(strings), per_call):
            emb = run(enc_text, te_p, np.asarray(tokenize(strings[s:s + per_call]), np.int32))
            if ctx is None:
                ctx = np.lib.format.open_memmap(tmp / f"context-{c:05d}.npy", "w+", dtype,
                                                (len(strings),) + emb.shape[1:])
            ctx[s:s + len(emb)] = emb.astype(dtype)
        if ctx is None:  # a process with no captions to encode
            d = pipe.text_encoder.config.hidden_size
            ctx = np.lib.format.open_memmap(tmp / f"context-{c:05d}.npy", "w+", dtype, (0, pipe.max_length, d))
        ctx.flush()
        del ctx
    pool.shutdown()
    if distributed.is_main_process() or part is None:
        null = run(enc_text, te_p, np.asarray(tokenize([""]), np.int32))[0]
        np.save(tmp / "null.npy", null.astype(np.float32))
