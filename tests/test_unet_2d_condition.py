"""UNet2DConditionModel equals diffusers' PyTorch UNet2DConditionModel, and loads as published.

diffusers builds tiny UNets from configs (SD1-like: conv projections, one head count; SD2-like:
linear projections, per-block heads, upcast attention, two transformer layers in a block), adds
N(0, 0.02) noise to every weight so no layer is zero, and `save_pretrained`s them; jaxdiff loads
the folders with its real loader. Tolerance: max |ours − torch| ≤ 1e-4 · max |torch| (float32,
matmul precision "highest"); the observed error is ~1e-6, round-off of ~40 layers.
"""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError
from helpers import nchw, perturb, rel_err
from jaxdiff.models.unet_2d_condition import (UNet2DConditionConfig, UNet2DConditionModel,
                                              load_unet_2d_condition)

RTOL = 1e-4

BASE = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8)
CONFIGS = {
    # SD 1.x: 1×1-conv projections, attention_head_dim an int (= number of heads), 768-style context
    "sd1": dict(BASE, layers_per_block=2, cross_attention_dim=24, attention_head_dim=4),
    # SD 2.x: linear projections, per-block head counts, upcast attention; plus deeper transformers
    "sd2": dict(BASE, layers_per_block=1, cross_attention_dim=40, attention_head_dim=(2, 4, 8),
                use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=(2, 1, 1)),
    # class-conditioned variant with only-cross-attention transformers and scale-shift resnets
    "class": dict(BASE, layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
                  num_class_embeds=5, only_cross_attention=(True, False, False),
                  resnet_time_scale_shift="scale_shift", flip_sin_to_cos=False, freq_shift=1),
}


def torch_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel as Ref

    torch.manual_seed(seed)
    return perturb(Ref(**config).eval())


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """name → (torch model, folder it was saved to)."""
    out = {}
    for name, config in CONFIGS.items():
        model = torch_unet(config)
        folder = tmp_path_factory.mktemp(f"unet-{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def inputs(config: dict, batch: int, h: int, w: int, tokens: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, h, w, config["in_channels"])).astype(np.float32)
    t = np.array([999, 17, 500][:batch], np.int64)
    ctx = rng.normal(size=(batch, tokens, config["cross_attention_dim"])).astype(np.float32)
    return x, t, ctx


def reference(model, x, t, ctx, class_labels=None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if class_labels is None else {"class_labels": torch.from_numpy(class_labels)}
        out = model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name,size", [("sd1", (16, 16)), ("sd2", (10, 14))])
def test_unet_matches_diffusers(unets, name, size):
    """SD1 and SD2 settings; (10, 14) is not divisible by 2**2, so the upsamplers take the skip
    connections' sizes (diffusers' forward_upsample_size)."""
    model, folder = unets[name]
    unet, params = load_unet_2d_condition(folder, subfolder=None)
    x, t, ctx = inputs(CONFIGS[name], 2, *size)
    got = jax.jit(unet.apply)({"params": params}, x, t, ctx)
    assert got.shape == x.shape[:3] + (4,) and got.dtype == jnp.float32
    assert rel_err(got, reference(model, x, t, ctx)) < RTOL


def test_class_conditioned_unet_matches_diffusers(unets):
    model, folder = unets["class"]
    unet, params = load_unet_2d_condition(folder, subfolder=None)
    x, t, ctx = inputs(CONFIGS["class"], 2, 8, 8)
    labels = np.array([3, 0])
    got = jax.jit(unet.apply)({"params": params}, x, t, ctx, labels)
    assert rel_err(got, reference(model, x, t, ctx, labels)) < RTOL
    with pytest.raises(JaxdiffError, match="class_labels"):
        unet.apply({"params": params}, x, t, ctx)


def test_flax_msgpack_and_safetensors_fixtures_load_the_same_weights(fixtures_dir):
    """tiny-sd-flax-v1 (old diffusers Flax msgpack) and tiny-sd-pt-v1 (PyTorch safetensors)
    hold the same weights: both load onto the same tree, bit for bit."""
    _, flax_params = load_unet_2d_condition(fixtures_dir / "tiny-sd-flax-v1")
    _, pt_params = load_unet_2d_condition(fixtures_dir / "tiny-sd-pt-v1")
    flat_f, flat_p = W.flatten(flax_params), W.flatten(pt_params)
    assert flat_f.keys() == flat_p.keys()
    for k in flat_f:
        np.testing.assert_array_equal(flat_f[k], flat_p[k], err_msg="/".join(k))
    unet, v2 = load_unet_2d_condition(fixtures_dir / "tiny-sd-flax-v2")  # SD2 layout: linear projections
    assert unet.config.use_linear_projection and unet.config.heads_per_block == (2, 4)
    assert v2["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (32, 32)


def test_fp16_variant_loads_in_the_requested_dtype(tmp_path):
    model = torch_unet(CONFIGS["sd1"], seed=1).half()
    model.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    _, params = load_unet_2d_condition(tmp_path, subfolder=None, variant="fp16", param_dtype=jnp.float32)
    kernel = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]
    want = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.detach()
    np.testing.assert_array_equal(kernel, want.float().numpy().T)
    _, bf16 = load_unet_2d_condition(tmp_path, subfolder=None, variant="fp16", dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(bf16))


def test_bfloat16_compute_stays_close_to_float32(unets):
    """bf16 activations (8-bit mantissa) over ~40 layers: a few percent of the output scale."""
    _, folder = unets["sd1"]
    unet32, params = load_unet_2d_condition(folder, subfolder=None)
    x, t, ctx = inputs(CONFIGS["sd1"], 2, 16, 16)
    want = jax.jit(unet32.apply)({"params": params}, x, t, ctx)
    unet16 = UNet2DConditionModel(unet32.config, dtype=jnp.bfloat16)
    got = jax.jit(unet16.apply)({"params": params}, x, t, ctx)
    assert got.dtype == jnp.float32
    assert rel_err(got, want) < 0.05


def test_shape_mismatch_names_the_file_and_the_parameter(unets, tmp_path):
    _, folder = unets["sd1"]
    bad = tmp_path / "unet"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(JaxdiffError, match=r"unet/diffusion_pytorch_model.safetensors.*attn2\.to_k"):
        load_unet_2d_condition(bad, subfolder=None)


@pytest.mark.parametrize("key,value,match", [
    ("addition_embed_type", "text_time", "addition_embed_type"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "SimpleCrossAttnDownBlock2D"),
    ("attention_head_dim", [4, 4], "attention_head_dim has 2 entries"),
])
def test_unsupported_or_inconsistent_configs_raise_one_clear_error(key, value, match):
    with pytest.raises(JaxdiffError, match=match):
        UNet2DConditionConfig.from_dict(dict(CONFIGS["sd1"], **{key: value}))
