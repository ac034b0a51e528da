"""jaxdiff.weights: diffusers/transformers weight folders → Flax parameter trees, and refusals.

The folders are real: a tiny diffusers `UNet2DModel` (convs, linears, group norms, attention)
`save_pretrained`-ed plain, as an fp16 variant, sharded (`max_shard_size`) and as Flax msgpack,
read by the real loader (`load_unet_2d` → `load_params` → `find_weights` / `iter_safetensors`).
Values are compared bit for bit (the loader only transposes and casts). Malformed safetensors
headers and shard indexes that point outside their folder each end in one JaxdiffError line.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel as RefUNet

from helpers import perturb
from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError
from jaxdiff.models.unet_2d import load_unet_2d, param_shapes

TINY = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=4)
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return perturb(RefUNet(**TINY).eval())


@pytest.fixture(scope="module")
def state(ref) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def plain(ref, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    ref.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(plain):
    return load_unet_2d(plain)


@pytest.fixture
def sharded(ref, tmp_path):
    folder = tmp_path / "sharded"
    ref.save_pretrained(folder, max_shard_size="20KB")
    return folder


def leaf(params, path: str) -> np.ndarray:
    for k in path.split("/"):
        params = params[k]
    return np.asarray(params)


def assert_same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------- renames

def test_pytorch_names_and_layouts_become_flax_ones(state, loaded):
    """conv (O, I, kh, kw) → kernel (kh, kw, I, O); linear (O, I) → (I, O); norm weight →
    scale; biases as they are; `down_blocks.1` → `down_blocks_1`."""
    _, params = loaded
    conv = state["down_blocks.1.resnets.0.conv1.weight"]
    np.testing.assert_array_equal(leaf(params, "down_blocks_1/resnets_0/conv1/kernel"), conv.transpose(2, 3, 1, 0))
    linear = state["time_embedding.linear_1.weight"]
    np.testing.assert_array_equal(leaf(params, "time_embedding/linear_1/kernel"), linear.T)
    np.testing.assert_array_equal(leaf(params, "down_blocks_1/attentions_0/to_q/kernel"),
                                  state["down_blocks.1.attentions.0.to_q.weight"].T)
    np.testing.assert_array_equal(leaf(params, "down_blocks_1/attentions_0/to_out_0/bias"),
                                  state["down_blocks.1.attentions.0.to_out.0.bias"])
    np.testing.assert_array_equal(leaf(params, "conv_norm_out/scale"), state["conv_norm_out.weight"])
    np.testing.assert_array_equal(leaf(params, "conv_norm_out/bias"), state["conv_norm_out.bias"])
    assert len(jax.tree.leaves(params)) == len(state)


def test_a_numeric_child_stands_alone_where_the_module_nests_a_list():
    template = {"layers": {"0": {"fc": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32)}}},
                "proj_1": {"scale": jax.ShapeDtypeStruct((2,), np.float32)}}
    fc, scale = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float32)
    params = W.torch_state_to_flax([("layers.0.fc.weight", fc), ("proj.1.gamma", scale)], template, source="test")
    np.testing.assert_array_equal(params["layers"]["0"]["fc"]["kernel"], fc.T)
    np.testing.assert_array_equal(params["proj_1"]["scale"], scale)


def test_export_gives_back_the_pytorch_names_and_layouts(state, loaded):
    _, params = loaded
    exported = W.flax_to_torch_state(params)
    assert set(exported) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


# ------------------------------------------------------------------------------- mismatches

def test_a_shape_mismatch_names_the_file_the_parameter_and_both_shapes(plain, tmp_path):
    shutil.copy(plain / WEIGHTS, tmp_path)
    config = json.loads((plain / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "in_channels": 2}))
    with pytest.raises(JaxdiffError) as e:
        load_unet_2d(tmp_path)
    message = str(e.value)
    assert str(tmp_path / WEIGHTS) in message and "'conv_in.weight'" in message
    assert "(8, 3, 3, 3)" in message and "(3, 3, 2, 8) for conv_in/kernel" in message and "\n" not in message


def test_weights_that_do_not_match_the_config_are_refused(plain, tmp_path):
    shutil.copy(plain / WEIGHTS, tmp_path)
    config = json.loads((plain / "config.json").read_text())
    config["block_out_channels"] = [8, 32]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(JaxdiffError, match="expects .* the weights do not match the config"):
        load_unet_2d(tmp_path)


def test_a_missing_tensor_is_named(state, plain, tmp_path):
    shutil.copy(plain / "config.json", tmp_path)
    W.save_safetensors({k: v for k, v in state.items() if k != "mid_block.attentions.0.to_k.bias"},
                       tmp_path / WEIGHTS)
    with pytest.raises(JaxdiffError, match=r"no weight for parameter 'mid_block/attentions_0/to_k/bias'"):
        load_unet_2d(tmp_path)


def test_an_unexpected_tensor_is_named(state, plain, tmp_path):
    shutil.copy(plain / "config.json", tmp_path)
    W.save_safetensors({**state, "extra_head.weight": np.zeros((2, 2), np.float32)}, tmp_path / WEIGHTS)
    with pytest.raises(JaxdiffError, match=r"parameter 'extra_head.weight' matches nothing in the model"):
        load_unet_2d(tmp_path)


def test_a_torch_pickle_alone_gets_a_clear_error(ref, tmp_path):
    ref.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(JaxdiffError, match="is a torch pickle, which jaxdiff does not read"):
        load_unet_2d(tmp_path)


# ------------------------------------------------------------------------------- formats

def test_fp16_variant_is_preferred_when_asked_and_upcast(ref, plain, loaded, tmp_path):
    shutil.copytree(plain, tmp_path, dirs_exist_ok=True)
    RefUNet.from_pretrained(plain).half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    _, full = load_unet_2d(tmp_path)
    _, half = load_unet_2d(tmp_path, variant="fp16")
    assert_same_params(full, loaded[1])
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(half))
    assert_same_params(half, jax.tree.map(lambda p: np.asarray(p).astype(np.float16).astype(np.float32), full))


def test_sharded_folder_loads_as_the_single_file(sharded, loaded):
    index = json.loads((sharded / INDEX).read_text())
    assert not (sharded / WEIGHTS).exists() and len(set(index["weight_map"].values())) > 2
    _, params = load_unet_2d(sharded)
    assert_same_params(params, loaded[1])


def test_flax_msgpack_folder_loads_as_the_safetensors(plain, loaded, tmp_path):
    from flax.serialization import msgpack_serialize

    shutil.copy(plain / "config.json", tmp_path)
    (tmp_path / "diffusion_flax_model.msgpack").write_bytes(
        msgpack_serialize(jax.tree.map(np.asarray, loaded[1])))
    _, params = load_unet_2d(tmp_path)
    assert_same_params(params, loaded[1])


def test_a_bad_msgpack_is_one_clear_error(plain, tmp_path):
    shutil.copy(plain / "config.json", tmp_path)
    (tmp_path / "diffusion_flax_model.msgpack").write_bytes(b"\xc1not msgpack")
    with pytest.raises(JaxdiffError, match="is not a valid Flax msgpack file"):
        load_unet_2d(tmp_path)


# ------------------------------------------------------------------------------- hardened headers

def write_safetensors(path, header, data: bytes = bytes(24), header_len: int | None = None) -> None:
    """8-byte little-endian header length (default: the header's), header, data; `header=None`
    writes `data` alone."""
    if header is None:
        path.write_bytes(data)
        return
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)


GOOD = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}


def entry(**change) -> dict:
    return {"w": {**GOOD["w"], **change}}


MALFORMED = {
    "shorter than the length field": (None, None, b"\x05\x00\x00", "3 bytes is too short for the 8-byte header"),
    "zero header length": (GOOD, 0, bytes(24), "header length 0 is not in 1.."),
    "huge header length": (GOOD, 2 ** 63, bytes(24), "header length 9223372036854775808 is not in 1.."),
    "header past the end": (GOOD, 10 ** 6, bytes(24), "runs past the end of the file"),
    "header not JSON": (b"{not json", None, bytes(24), "header is not valid JSON"),
    "header a JSON list": ([1, 2], None, bytes(24), "header is a JSON list, not an object"),
    "metadata not an object": ({**GOOD, "__metadata__": [1]}, None, bytes(24), "__metadata__ is not an object"),
    "entry not an object": ({"w": [0, 24]}, None, bytes(24), "tensor 'w': header entry is a list"),
    "unknown dtype": (entry(dtype="F128"), None, bytes(24), "tensor 'w': unknown dtype 'F128'"),
    "negative shape": (entry(shape=[-2, -3]), None, bytes(24), r"shape \[-2, -3\] is not a list of non-negative"),
    "shape not a list": (entry(shape="2x3"), None, bytes(24), "shape '2x3' is not a list"),
    "boolean in shape": (entry(shape=[True, 6]), None, bytes(24), "is not a list of non-negative integers"),
    "offsets not integers": (entry(data_offsets=[0.0, 24.0]), None, bytes(24), "is not a pair of integers"),
    "three offsets": (entry(data_offsets=[0, 12, 24]), None, bytes(24), "is not a pair of integers"),
    # 24 bytes = 2×3 float32 from 8 bytes before the data: read header bytes as weights before
    "negative start": (entry(data_offsets=[-8, 16]), None, bytes(24), r"data_offsets \[-8, 16\] are not within"),
    "end past the data": (entry(data_offsets=[8, 32]), None, bytes(24), r"data_offsets \[8, 32\] are not within the 24"),
    "start after end": (entry(data_offsets=[24, 0]), None, bytes(24), r"\[24, 0\] are not within"),
    "span not the shape's size": (entry(data_offsets=[0, 16]), None, bytes(24), "span 16 bytes, but shape .* needs 24"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_safetensors_headers_are_one_clear_error(tmp_path, case):
    header, header_len, data, message = MALFORMED[case]
    path = tmp_path / "model.safetensors"
    write_safetensors(path, header, data, header_len)
    with pytest.raises(JaxdiffError, match=message) as e:
        list(W.iter_safetensors(path))
    assert str(e.value).startswith(f"{path} is not a valid safetensors file: ") and "\n" not in str(e.value)
    with pytest.raises(JaxdiffError, match=message):
        W.safetensors_names(path)  # the header-only reader (CLIP's architecture probe) checks too


def test_a_valid_hand_written_file_reads_as_safetensors_writes_it(tmp_path):
    from safetensors.numpy import load_file

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {**GOOD, "__metadata__": {"format": "pt"}}, values.tobytes())
    assert_same_params(dict(W.iter_safetensors(path)), load_file(path))
    np.testing.assert_array_equal(dict(W.iter_safetensors(path))["w"], values)


def test_a_header_naming_more_data_than_the_file_holds_is_refused_before_reading(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(16))
    with pytest.raises(JaxdiffError, match=r"tensor 'b': data_offsets \[8, 24\] are not within the 16"):
        next(W.iter_safetensors(path))  # the first tensor is fine, but nothing is read


# ------------------------------------------------------------------------------- shard paths

def move_shard(folder, to, *, symlink: bool = False, name=None) -> str:
    """Move the first shard of `folder` to `to`; the index then names `name` (default: the new
    path, absolute), or a symlink inside the folder points to it."""
    index_path = folder / INDEX
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder / shard, to)
    if symlink:
        os.symlink(to, folder / shard)
        return shard
    name = str(to) if name is None else name
    index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return name


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shards_outside_the_model_folder_are_refused_unless_allowed(sharded, loaded, how):
    outside = sharded.parent / "elsewhere" / "shard.safetensors"
    if how == "dotdot":
        name = move_shard(sharded, outside, name="../elsewhere/shard.safetensors")
    else:
        name = move_shard(sharded, outside, symlink=how == "symlink")
    with pytest.raises(JaxdiffError) as e:
        load_unet_2d(sharded)
    message = str(e.value)
    assert f"names shard {name!r}, which resolves to {outside.resolve()}, outside the model folder" in message
    assert "allow_outside_paths=True" in message and "\n" not in message
    _, params = load_unet_2d(sharded, allow_outside_paths=True)
    assert_same_params(params, loaded[1])


def test_hub_cache_symlinks_into_blobs_are_inside(ref, loaded, tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<files> are symlinks to ../../blobs/<hash>."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    ref.save_pretrained(snapshot, max_shard_size="20KB")
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(snapshot.glob("*.safetensors"))):
        blob = repo / "blobs" / f"blob{i}"
        shutil.move(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), f)
    _, params = load_unet_2d(snapshot)
    assert_same_params(params, loaded[1])


def test_a_missing_shard_and_a_bad_weight_map_are_clear_errors(sharded):
    index = json.loads((sharded / INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (sharded / shard).unlink()
    with pytest.raises(JaxdiffError, match=f"names shard '{shard}' that is not in the folder"):
        load_unet_2d(sharded)
    (sharded / INDEX).write_text(json.dumps({**index, "weight_map": ["a.safetensors"]}))
    with pytest.raises(JaxdiffError, match="'weight_map' must map tensor names to shard file names"):
        load_unet_2d(sharded)


@pytest.mark.parametrize("name", ["config.json", INDEX])
def test_json_files_that_are_not_objects_are_one_clear_error(sharded, name):
    (sharded / name).write_text("[1, 2]")
    with pytest.raises(JaxdiffError, match=f"{name} holds a JSON list, not an object"):
        load_unet_2d(sharded)


def test_param_shapes_is_the_loaders_template(loaded):
    module, params = loaded
    shapes = jax.tree.map(lambda s: s.shape, param_shapes(module))
    assert shapes == jax.tree.map(np.shape, params)
