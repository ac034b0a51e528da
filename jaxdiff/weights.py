"""Published weight folders → Flax parameter trees (and back), without torch.

A diffusers/transformers folder holds `config.json` and either PyTorch-layout `*.safetensors`
(`diffusion_pytorch_model[.fp16].safetensors`, `model.safetensors`, sharded with an
`*.index.json`) or the old Flax `*.msgpack`. Our Flax modules use the parameter names of the
diffusers/transformers Flax ports, so:

* msgpack trees load as they are (after an optional rename of old names);
* PyTorch names map by rule: ``down_blocks.0.resnets.1.conv1.weight`` →
  ``down_blocks_0/resnets_1/conv1/kernel`` (or ``layers/0`` where the module nests a list as a
  collection), conv weights ``(O, I, kh, kw)`` → kernels ``(kh, kw, I, O)``, linear ``(O, I)`` →
  ``(I, O)``, norm ``weight`` → ``scale``, embedding ``weight`` → ``embedding``.

Every leaf is checked against the module's own parameter shapes (``jax.eval_shape`` of
``module.init``); unused and missing names are reported with the file they came from.
Tensors are read one at a time (plain reads, no memory map), so loading needs little more host
memory than the parameters themselves.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from jaxdiff.errors import JaxdiffError

Params = dict  # nested dict of arrays: the Flax 'params' collection
Rename = Callable[[str], str]

SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
MSGPACK_NAMES = ("diffusion_flax_model.msgpack", "flax_model.msgpack")
TORCH_PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")

# ModuleList attributes in diffusers/transformers: their numeric children join with "_" in Flax
# (``down_blocks.0`` ↔ ``down_blocks_0``); used when exporting back to PyTorch names.
TORCH_LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net", "layers",
})


# --------------------------------------------------------------------------------------------
# Folders and configs
# --------------------------------------------------------------------------------------------

def read_json(path: str | os.PathLike) -> dict:
    """A JSON file that must hold an object (config.json, model_index.json, shard indexes)."""
    path = Path(path)
    if not path.is_file():
        raise JaxdiffError(f"missing file {path}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxdiffError(f"{path} is not valid JSON ({e}); re-download or re-save the folder") from None
    if not isinstance(value, dict):
        raise JaxdiffError(f"{path} holds a JSON {type(value).__name__}, not an object; re-download or "
                           "re-save the folder")
    return value


def model_folder(folder: str | os.PathLike, subfolder: str | None = None) -> Path:
    """The folder holding `config.json`: `folder` itself, or `folder/subfolder` of a pipeline."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise JaxdiffError(f"model folder {root} does not exist")
    if not root.is_dir():
        raise JaxdiffError(f"{root} is not a folder; pass the folder that holds config.json")
    if (root / "config.json").is_file():
        return root
    if subfolder and (root / subfolder / "config.json").is_file():
        return root / subfolder
    where = f"{root}/config.json" + (f" or {root}/{subfolder}/config.json" if subfolder else "")
    raise JaxdiffError(f"no {where}: not a diffusers/transformers model folder")


def read_config(folder: str | os.PathLike, subfolder: str | None = None,
                expect_class: Iterable[str] | str | None = None) -> tuple[Path, dict]:
    """(resolved folder, config dict). `expect_class` checks diffusers' `_class_name`
    (a `Flax` prefix is accepted) or transformers' `architectures`/`model_type`."""
    path = model_folder(folder, subfolder)
    config = read_json(path / "config.json")
    if expect_class is not None:
        wanted = {expect_class} if isinstance(expect_class, str) else set(expect_class)
        names = set(config.get("architectures") or [])
        for key in ("_class_name", "model_type"):
            if config.get(key):
                names.add(str(config[key]))
        names |= {n[len("Flax"):] for n in names if n.startswith("Flax")}
        if names and not names & wanted:
            found = ", ".join(sorted(names))
            raise JaxdiffError(
                f"{path} holds a {found}, not a {' / '.join(sorted(wanted))}; "
                f"point to a folder with the right model")
    return path, config


def find_weights(folder: Path, variant: str | None = None, *,
                 allow_outside_paths: bool = False) -> list[Path]:
    """The weight files of a model folder: safetensors (sharded or not, optional `variant`
    such as "fp16"), else Flax msgpack. A folder with only a torch pickle gets a clear error.

    The shard names of a `*.safetensors.index.json` must resolve (symlinks followed) inside
    `folder` (or, in a Hugging Face hub cache, inside the repository's `blobs/`); pass
    `allow_outside_paths=True` to read shards from anywhere."""
    folder = Path(folder)
    names = list(SAFETENSORS_NAMES)
    if variant:
        names = [n.replace(".safetensors", f".{variant}.safetensors") for n in names] + names
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            return shard_files(index, allow_outside_paths=allow_outside_paths)
    for name in MSGPACK_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    for name in TORCH_PICKLE_NAMES:
        if (folder / name).is_file():
            raise JaxdiffError(
                f"{folder / name} is a torch pickle, which jaxdiff does not read; convert it to "
                "safetensors (diffusers: save_pretrained(..., safe_serialization=True))")
    raise JaxdiffError(
        f"no weights in {folder}: expected one of {', '.join(SAFETENSORS_NAMES + MSGPACK_NAMES)}")


def shard_files(index: Path, *, allow_outside_paths: bool = False) -> list[Path]:
    """The shard files a `*.safetensors.index.json` names in its `weight_map`, in name order,
    each checked to exist and (unless `allow_outside_paths`) to lie inside the index's folder."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map \
            or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise JaxdiffError(f"{index}: 'weight_map' must map tensor names to shard file names; "
                           "re-download the model")
    folder = index.parent
    shards = []
    for name in sorted(set(weight_map.values())):
        path = folder / name
        if not allow_outside_paths:
            _check_inside(path, folder, f"{index} names shard {name!r}")
        if not path.is_file():
            raise JaxdiffError(f"{index} names shard {name!r} that is not in the folder; "
                               "re-download the model")
        shards.append(path)
    return shards


def _check_inside(path: Path, folder: Path, what: str) -> None:
    """`path`, symlinks resolved, must lie under `folder` (or a hub cache's `blobs/`)."""
    resolved = path.resolve()
    roots = [folder.resolve()]
    roots += [p.parent.parent / "blobs" for p in [roots[0], *roots[0].parents]
              if p.parent.name == "snapshots" and (p.parent.parent / "blobs").is_dir()]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise JaxdiffError(f"{what}, which resolves to {resolved}, outside the model folder "
                           f"{roots[0]}; move the shard into the folder (or pass "
                           f"allow_outside_paths=True if you trust the index)")


# --------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------

def _safetensors_dtypes() -> dict:
    import ml_dtypes  # a dependency of jax

    return {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
        "BOOL": np.bool_,
    }


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


class _Corrupt(Exception):
    """A problem found in a safetensors file, turned into one JaxdiffError line by the caller."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(name: str, info, data_len: int, dtypes: Mapping) -> tuple:
    """(dtype, shape, start, end) of a header entry, or `_Corrupt` naming what is wrong."""
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        raise _Corrupt(f"{where}: header entry is a {type(info).__name__}, not an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise _Corrupt(f"{where}: unknown dtype {dtype!r} (known: {', '.join(dtypes)})")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _Corrupt(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = info.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise _Corrupt(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise _Corrupt(f"{where}: data_offsets [{start}, {end}] are not within the "
                       f"{data_len} data bytes (0 <= start <= end <= data size); the file is "
                       "truncated or corrupt")
    nbytes = math.prod(shape) * np.dtype(dtypes[dtype]).itemsize
    if end - start != nbytes:
        raise _Corrupt(f"{where}: data_offsets span {end - start} bytes, but shape {shape} of "
                       f"{dtype} needs {nbytes}")
    return dtypes[dtype], tuple(shape), start, end


def read_safetensors_header(f, path: Path, size: int) -> tuple[dict, int]:
    """({name: (dtype, shape, start, end)}, data start) of an open safetensors file, every
    entry checked against the file's size; any problem is one JaxdiffError line naming `path`."""
    dtypes = _safetensors_dtypes()
    try:
        raw = f.read(8)
        if len(raw) < 8:
            raise _Corrupt(f"{size} bytes is too short for the 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw)
        if not 0 < header_len <= MAX_HEADER_BYTES:
            raise _Corrupt(f"header length {header_len} is not in 1..{MAX_HEADER_BYTES}")
        if 8 + header_len > size:
            raise _Corrupt(f"header length {header_len} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise _Corrupt(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise _Corrupt(f"header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict):
            raise _Corrupt("__metadata__ is not an object")
        data_start = 8 + header_len
        entries = {name: _check_entry(name, info, size - data_start, dtypes)
                   for name, info in header.items()}
    except _Corrupt as e:
        raise JaxdiffError(f"{path} is not a valid safetensors file: {e}; re-download it") from None
    return entries, data_start


def safetensors_names(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file (its header only, validated)."""
    path = Path(path)
    with open(path, "rb") as f:
        return list(read_safetensors_header(f, path, path.stat().st_size)[0])


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs of a safetensors file, read one tensor at a time into a fresh array.

    The whole header is validated first (see `read_safetensors_header`). Plain reads, not a
    memory map: pages of a map stay resident (and counted) until it is closed, which would add
    the whole file to the loader's peak memory; here only the tensor being converted is held
    besides what the caller keeps."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        entries, data_start = read_safetensors_header(f, path, size)
        for name, (dtype, shape, start, end) in entries.items():
            array = np.empty(shape, dtype)
            f.seek(data_start + start)
            if f.readinto(array.reshape(-1).view(np.uint8)) != end - start:
                raise JaxdiffError(f"{path}: tensor {name!r} is truncated; re-download the file")
            yield name, array


def read_msgpack(path: str | os.PathLike) -> dict:
    """A Flax msgpack checkpoint as a nested dict of numpy arrays."""
    from flax.serialization import msgpack_restore

    try:
        tree = msgpack_restore(Path(path).read_bytes())
    except Exception as e:  # msgpack raises many types for a bad file
        raise JaxdiffError(f"{path} is not a valid Flax msgpack file ({type(e).__name__}); re-download it") from None
    if not isinstance(tree, dict):
        raise JaxdiffError(f"{path} does not hold a parameter tree")
    return tree


# --------------------------------------------------------------------------------------------
# Name mapping
# --------------------------------------------------------------------------------------------

def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def unflatten(flat: Mapping[tuple, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _candidate_paths(torch_key: str) -> Iterator[tuple[str, ...]]:
    """Flax paths a PyTorch name can take: each numeric part either joins the name before it
    (``down_blocks.0`` → ``down_blocks_0``) or stands alone (``layers.0`` → ``layers/0``)."""
    parts = torch_key.split(".")
    if "Conv2d_0" in parts:  # diffusers' Downsample2D registers its conv as both names
        yield from _candidate_paths(".".join("conv" if p == "Conv2d_0" else p for p in parts))
    numeric = [i for i, p in enumerate(parts) if p.isdigit() and i > 0]
    for joins in itertools.product((True, False), repeat=len(numeric)):
        join = dict(zip(numeric, joins))
        path: list[str] = []
        for i, p in enumerate(parts):
            if join.get(i):
                path[-1] = f"{path[-1]}_{p}"
            else:
                path.append(p)
        leaf = path[-1]
        if leaf == "weight":
            for alt in ("kernel", "scale", "embedding", "weight"):
                yield tuple(path[:-1]) + (alt,)
        elif leaf == "gamma":
            yield tuple(path[:-1]) + ("scale",)
        elif leaf == "beta":
            yield tuple(path[:-1]) + ("bias",)
        else:
            yield tuple(path)


def torch_to_flax_array(value: np.ndarray, flax_leaf: str, target_shape: tuple) -> np.ndarray:
    """Re-lay a PyTorch tensor for a Flax leaf: conv and linear kernels are transposed."""
    if flax_leaf == "kernel":
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 3:
            value = value.transpose(2, 1, 0)
        elif value.ndim == 2:
            value = value.T
        if value.ndim == 4 and len(target_shape) == 2 and value.shape[:2] == (1, 1):
            value = value[0, 0]  # a 1×1 conv stored where we use a Dense
        elif value.ndim == 2 and len(target_shape) == 4 and target_shape[:2] == (1, 1):
            value = value[None, None]  # a Linear stored where we use a 1×1 conv
    return value


def flax_to_torch_array(value: np.ndarray, flax_leaf: str) -> np.ndarray:
    if flax_leaf == "kernel":
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
        if value.ndim == 3:
            return value.transpose(2, 1, 0)
        if value.ndim == 2:
            return value.T
    return value


def _shape_of(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def _dtype_of(x, default):
    return getattr(x, "dtype", default)


def _contiguous(value, dtype=None) -> np.ndarray:
    """`np.ascontiguousarray` that keeps 0-d arrays 0-d (CLIP's `logit_scale`)."""
    return np.ascontiguousarray(value, dtype=dtype).reshape(np.shape(value))


def _cast(value: np.ndarray, dtype) -> np.ndarray:
    return _contiguous(value, dtype)


def torch_state_to_flax(
    tensors: Iterable[tuple[str, np.ndarray]],
    template: Mapping,
    *,
    source: str,
    rename: Rename | None = None,
    ignore: Callable[[str], bool] | None = None,
    dtype=None,
) -> Params:
    """Map (PyTorch name, array) pairs onto `template` (a nested dict of shapes: the Flax
    'params' collection, e.g. from ``jax.eval_shape``). Names for which `ignore` is true
    (buffers such as ``position_ids``) are skipped; every template leaf must be filled."""
    flat_template = flatten(template)
    filled: dict[tuple, np.ndarray] = {}
    unused: list[str] = []
    for key, value in tensors:
        key = rename(key) if rename else key
        if ignore and ignore(key):
            continue
        path = next((p for p in _candidate_paths(key) if p in flat_template), None)
        if path is None:
            unused.append(key)
            continue
        want = _shape_of(flat_template[path])
        array = torch_to_flax_array(value, path[-1], want)
        if tuple(array.shape) != want:
            raise JaxdiffError(
                f"{source}: parameter {key!r} has shape {tuple(value.shape)}, but the model built "
                f"from config.json expects {want} for {'/'.join(path)}; the weights do not match "
                f"the config")
        filled[path] = _cast(array, dtype or _dtype_of(flat_template[path], np.float32))
    _report(source, flat_template, filled, unused)
    return unflatten(filled)


def flax_tree_to_flax(tree: Mapping, template: Mapping, *, source: str,
                      rename: Rename | None = None, dtype=None) -> Params:
    """Check (and optionally rename, as '/'-joined paths) a Flax msgpack tree against `template`."""
    flat_template = flatten(template)
    filled: dict[tuple, np.ndarray] = {}
    unused: list[str] = []
    for path, value in flatten(tree).items():
        name = "/".join(path)
        if rename:
            name = rename(name)
            path = tuple(name.split("/"))
        if path not in flat_template:
            unused.append(name)
            continue
        want = _shape_of(flat_template[path])
        if tuple(np.shape(value)) != want:
            raise JaxdiffError(
                f"{source}: parameter {name!r} has shape {tuple(np.shape(value))}, but the model "
                f"built from config.json expects {want}; the weights do not match the config")
        filled[path] = _cast(np.asarray(value), dtype or _dtype_of(flat_template[path], np.float32))
    _report(source, flat_template, filled, unused)
    return unflatten(filled)


def _report(source: str, flat_template: Mapping, filled: Mapping, unused: list[str]) -> None:
    missing = ["/".join(p) for p in flat_template if p not in filled]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise JaxdiffError(
            f"{source}: no weight for parameter {missing[0]!r}{more}; the file does not match "
            f"the config (unused names in the file: {', '.join(unused[:3]) or 'none'})")
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise JaxdiffError(
            f"{source}: parameter {unused[0]!r} matches nothing in the model built from "
            f"config.json ({', '.join(unused[1:3])}{more}); the weights do not match the config")


def load_params(folder: Path, template: Mapping, *, variant: str | None = None,
                torch_rename: Rename | None = None, flax_rename: Rename | None = None,
                ignore: Callable[[str], bool] | None = None,
                msgpack_root: str | None = None, dtype=None,
                allow_outside_paths: bool = False) -> Params:
    """Load the weights of `folder` (see `find_weights`) onto `template`.

    `msgpack_root` strips a top-level key some Flax checkpoints carry (transformers' CLIP
    text model saves under its own name); `dtype` overrides the template's dtype;
    `allow_outside_paths` lets a shard index name files outside `folder`."""
    files = find_weights(folder, variant, allow_outside_paths=allow_outside_paths)
    if files[0].suffix == ".msgpack":
        tree = read_msgpack(files[0])
        if msgpack_root and msgpack_root in tree and len(tree) == 1:
            tree = tree[msgpack_root]
        return flax_tree_to_flax(tree, template, source=str(files[0]), rename=flax_rename, dtype=dtype)
    tensors = itertools.chain.from_iterable(iter_safetensors(f) for f in files)
    source = str(files[0]) if len(files) == 1 else f"{folder} (sharded safetensors)"
    return torch_state_to_flax(tensors, template, source=source, rename=torch_rename,
                               ignore=ignore, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def flax_to_torch_state(params: Mapping, *, list_names: Iterable[str] = TORCH_LIST_NAMES,
                        rename: Rename | None = None, dtype=np.float32) -> dict[str, np.ndarray]:
    """Flax params → PyTorch state-dict names and layouts (arrays as numpy)."""
    list_names = frozenset(list_names)
    out: dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        parts: list[str] = []
        for p in path[:-1]:
            base, _, idx = p.rpartition("_")
            parts.extend([base, idx] if idx.isdigit() and base in list_names else [p])
        leaf = path[-1]
        parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
        key = ".".join(parts)
        key = rename(key) if rename else key
        out[key] = _contiguous(flax_to_torch_array(np.asarray(value, dtype=dtype), leaf))
    return out


def save_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary file, then rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: _contiguous(v) for k, v in state.items()}, tmp,
                  metadata=dict(metadata or {"format": "pt"}))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_json(obj: Mapping, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_model_folder(folder: str | os.PathLike, params: Mapping, template: Mapping, config: Mapping,
                      *, weights_name: str = "diffusion_pytorch_model", dtype=np.float32,
                      variant: str | None = None, rename: Rename | None = None) -> Path:
    """Write `params` (checked against `template`: same names, same shapes) as a diffusers /
    transformers folder: `<weights_name>[.<variant>].safetensors` in PyTorch names and layouts,
    and `config.json` (the config's `to_dict()`). Each file is written atomically."""
    folder = Path(folder).expanduser()
    flat, flat_template = flatten(params), flatten(template)
    if set(flat) != set(flat_template):
        extra = sorted("/".join(k) for k in set(flat) - set(flat_template))
        missing = sorted("/".join(k) for k in set(flat_template) - set(flat))
        raise JaxdiffError(f"params do not match the module: missing {missing[:3]}, unexpected "
                           f"{extra[:3]}; pass the params that belong to this module")
    for path, value in flat.items():
        if tuple(np.shape(value)) != _shape_of(flat_template[path]):
            raise JaxdiffError(f"parameter {'/'.join(path)} has shape {tuple(np.shape(value))}, the "
                               f"module expects {_shape_of(flat_template[path])}")
    import jax

    state = flax_to_torch_state(jax.device_get(params), dtype=dtype, rename=rename)
    save_safetensors(state, folder / (weights_name + (f".{variant}" if variant else "") + ".safetensors"))
    save_json(config, folder / "config.json")
    return folder
