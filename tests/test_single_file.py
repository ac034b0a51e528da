"""Single-file checkpoints (jaxdiff.single_file): tiny SD 1.x and SD 2.x-v pipelines are written
here in the original CompVis/Stability layout (the inverse of diffusers' conversion, below) and
loaded by jaxdiff and by diffusers' `from_single_file` (with the tiny pipeline's folder as its
local config, offline): images from the same latents agree within 5e-4 (float32, as
test_stable_diffusion). Pickles are refused; the shipped CLIP tokenizer gives CLIP's ids.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import nhwc, perturb

from jaxdiff import single_file as S
from jaxdiff.errors import JaxdiffError

ATOL = 5e-4
SIZE, STEPS = 32, 3
PROMPTS = ["a photo of a red apple", "an astronaut riding a horse"]
NEGATIVE = ["blurry", "low quality"]


# ------------------------------------------------------------------------------------------------
# diffusers names → the original layout (the inverse of diffusers' convert_ldm_* functions)
# ------------------------------------------------------------------------------------------------

_RESNET_BACK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _resnet_back(rest):
    head, _, tail = rest.partition(".")
    return f"{_RESNET_BACK[head]}.{tail}"


def unet_to_ldm(name, layers_per_block, up_has_attention):
    n = layers_per_block + 1
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, _, leaf = name.rpartition(".")
    if module in top:
        return f"{top[module]}.{leaf}"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", name)
    if m:
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{b * n + n}.0.op.{rest.removeprefix('conv.')}"
        j = b * n + i + 1
        return f"input_blocks.{j}.0.{_resnet_back(rest)}" if kind == "resnets" else f"input_blocks.{j}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        return (f"middle_block.{2 * int(m[2])}.{_resnet_back(m[3])}" if m[1] == "resnets"
                else f"middle_block.1.{m[3]}")
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", name)
    b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
    if kind == "upsamplers":
        return f"output_blocks.{b * n + layers_per_block}.{2 if up_has_attention[b] else 1}.{rest}"
    j = b * n + i
    return f"output_blocks.{j}.0.{_resnet_back(rest)}" if kind == "resnets" else f"output_blocks.{j}.1.{rest}"


def vae_to_ldm(name, value, num_up):
    name = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", name)
    if m:
        short = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
        if value.ndim == 2:
            value = value[:, :, None, None]  # the original stores 1×1 convs
        return f"{m[1]}.mid.attn_1.{short}.{m[3]}", value
    name = re.sub(r"mid_block\.resnets\.(\d+)", lambda k: f"mid.block_{int(k[1]) + 1}", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda k: f"decoder.up.{num_up - 1 - int(k[1])}.block", name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                  lambda k: f"decoder.up.{num_up - 1 - int(k[1])}.upsample", name)
    return name, value


def open_clip_from_transformers(state, rng):
    """transformers CLIPTextModel names → OpenCLIP's text tower (q/k/v fused into in_proj)."""
    out = {}
    for name, value in state.items():
        name = name.removeprefix("text_model.")
        if name.endswith("position_ids"):
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", name)
        if m:
            i, rest = m[1], m[2]
            p = f"transformer.resblocks.{i}."
            qkv = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if qkv:
                if qkv[1] == "q":
                    parts = [state[f"text_model.encoder.layers.{i}.self_attn.{x}_proj.{qkv[2]}"]
                             if f"text_model.encoder.layers.{i}.self_attn.{x}_proj.{qkv[2]}" in state
                             else state[f"encoder.layers.{i}.self_attn.{x}_proj.{qkv[2]}"] for x in "qkv"]
                    out[p + f"attn.in_proj_{qkv[2]}"] = np.concatenate(parts, axis=0)
                continue
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                if rest.startswith(a + "."):
                    out[p + b + rest[len(a):]] = value
            continue
        out[{"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}[name]] = value
    hidden = out["ln_final.weight"].shape[0]
    out["text_projection"] = rng.standard_normal((hidden, hidden)).astype(np.float32)
    out["logit_scale"] = np.asarray(4.6, np.float32)
    return out


def write_single_file(pipe, path, open_clip=False):
    """A diffusers pipeline's weights as one original-layout safetensors file."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    unet_cfg = pipe.unet.config
    up_attn = ["CrossAttn" in t for t in unet_cfg.up_block_types]
    tensors = {}
    for k, v in pipe.unet.state_dict().items():
        tensors["model.diffusion_model." + unet_to_ldm(k, unet_cfg.layers_per_block, up_attn)] = v.numpy()
    for k, v in pipe.vae.state_dict().items():
        name, value = vae_to_ldm(k, v.numpy(), len(pipe.vae.config.up_block_types))
        tensors["first_stage_model." + name] = value
    te = {k: v.numpy() for k, v in pipe.text_encoder.state_dict().items()}
    if open_clip:
        for k, v in open_clip_from_transformers(te, rng).items():
            tensors["cond_stage_model.model." + k] = v
    else:
        for k, v in te.items():
            k = k if k.startswith("text_model.") else "text_model." + k
            tensors["cond_stage_model.transformer." + k] = v
    tensors["alphas_cumprod"] = np.linspace(1, 0.01, 1000).astype(np.float32)  # an LDM buffer
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def build_sd2_v_folder(folder, fixtures_dir):
    """A tiny SD 2.x-v pipeline (linear projections, per-block heads, upcast attention, gelu
    text encoder, '!' padding, v-prediction DDIM) saved by diffusers."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True))
    vae = perturb(AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32))
    text_encoder = perturb(CLIPTextModel(CLIPTextConfig(
        vocab_size=523, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", bos_token_id=521,
        eos_token_id=522, pad_token_id=0)))
    tokenizer = CLIPTokenizer.from_pretrained(fixtures_dir / "tiny-sd-flax-v2" / "tokenizer")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd1_file(fixtures_dir, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = fixtures_dir / "tiny-sd-pt-v1"
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    return folder, write_single_file(pipe, tmp_path_factory.mktemp("sd1") / "sd1.safetensors")


# ------------------------------------------------------------------------------------------------
# Default suite
# ------------------------------------------------------------------------------------------------

def test_pickles_and_other_files_are_refused_without_reading(tmp_path):
    for suffix in (".ckpt", ".pt", ".bin"):
        f = tmp_path / f"model{suffix}"
        f.write_bytes(b"\x80\x04not read")
        with pytest.raises(JaxdiffError, match=r"pickle.*never unpickles.*\.safetensors"):
            S.load_single_file(f)
    with pytest.raises(JaxdiffError, match="does not exist"):
        S.load_single_file(tmp_path / "missing.safetensors")


def test_family_is_detected_from_the_keys():
    v2 = {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    v1 = {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    assert S.detect_family(v1) == "sd-v1"
    assert S.detect_family(v2) == "sd-v2"
    assert S.detect_family(v2, "epsilon") == "sd-v2-base"
    with pytest.raises(JaxdiffError, match="SDXL"):
        S.detect_family({"conditioner.embedders.1.model.positional_embedding": (77, 1280)})
    with pytest.raises(JaxdiffError, match="9 input channels"):
        S.detect_family({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})


def test_names_convert_as_diffusers_converts_them():
    assert S.ldm_unet_name("input_blocks.4.0.in_layers.2.weight", 2) == "down_blocks.1.resnets.0.conv1.weight"
    assert S.ldm_unet_name("input_blocks.3.0.op.bias", 2) == "down_blocks.0.downsamplers.0.conv.bias"
    assert S.ldm_unet_name("input_blocks.1.1.proj_in.weight", 2) == "down_blocks.0.attentions.0.proj_in.weight"
    assert S.ldm_unet_name("middle_block.2.emb_layers.1.bias", 2) == "mid_block.resnets.1.time_emb_proj.bias"
    assert S.ldm_unet_name("output_blocks.2.1.conv.weight", 2) == "up_blocks.0.upsamplers.0.conv.weight"
    assert S.ldm_unet_name("output_blocks.5.2.conv.weight", 2) == "up_blocks.1.upsamplers.0.conv.weight"
    assert S.ldm_unet_name("output_blocks.5.0.skip_connection.weight", 2) == "up_blocks.1.resnets.2.conv_shortcut.weight"
    assert S.ldm_vae_name("decoder.up.3.block.0.nin_shortcut.weight", 4) == "decoder.up_blocks.0.resnets.0.conv_shortcut.weight"
    assert S.ldm_vae_name("encoder.mid.attn_1.proj_out.bias", 4) == "encoder.mid_block.attentions.0.to_out.0.bias"


def test_shipped_tokenizer_gives_clips_ids():
    """The vocabulary derived from CLIP's BPE file: known ids of CLIP ViT-L/14's tokenizer, and
    the pad token of each family (SD 2.x pads with '!', id 0)."""
    from jaxdiff.tokenizer import tokenize

    tok1 = S.load_family_tokenizer(S.CONFIGS / "sd-v1")
    tok2 = S.load_family_tokenizer(S.CONFIGS / "sd-v2")
    ids = tokenize(tok1, ["a photo of a cat", "an astronaut riding a horse"], 77)
    np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 49407, 49407])
    np.testing.assert_array_equal(ids[1, :7], [49406, 550, 18376, 6765, 320, 4558, 49407])
    assert tokenize(tok2, ["a photo of a cat"], 77)[0, 7] == 0 and tok1.vocab_size == 49408


# ------------------------------------------------------------------------------------------------
# Images against diffusers' from_single_file (extended)
# ------------------------------------------------------------------------------------------------

def _latents(seed=0):
    import torch

    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _compare(file, config_dir, prediction_type=None):
    import torch
    from diffusers import StableDiffusionPipeline

    from jaxdiff.pipelines import stable_diffusion as sd

    # diffusers takes the scheduler from `config_dir` (its legacy `prediction_type=` argument
    # also rescales the betas: 0.02..0.085 instead of the folder's 0.00085..0.012).
    ref = StableDiffusionPipeline.from_single_file(str(file), config=str(config_dir), local_files_only=True,
                                                   safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = ref(PROMPTS, negative_prompt=NEGATIVE, latents=_latents().clone(), num_inference_steps=STEPS,
                   guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np").images
    pipe, params = S.load_single_file(file, config_dir=config_dir, prediction_type=prediction_type,
                                      dtype=jnp.float32)
    ids, neg = sd.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    config = sd.GenerateConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    got = sd.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, config=config, latents=nhwc(_latents()))
    np.testing.assert_allclose(got, want, atol=ATOL)
    return pipe, params


@pytest.mark.extended
def test_sd1_single_file_matches_from_single_file(sd1_file, sd):
    folder, file = sd1_file
    _, params = _compare(file, folder)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(sd[1])):  # the folder's weights, exactly
        np.testing.assert_array_equal(got, want)


@pytest.mark.extended
def test_sd2_v_single_file_matches_from_single_file(fixtures_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = build_sd2_v_folder(tmp_path / "sd2", fixtures_dir)
    file = write_single_file(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None),
                             tmp_path / "sd2.safetensors", open_clip=True)
    pipe, _ = _compare(file, folder, "v_prediction")
    assert pipe.scheduler.prediction_type == "v_prediction" and pipe.unet.config.use_linear_projection


@pytest.mark.extended
def test_sample_program_reads_a_model_file(sd1_file, sd, tmp_path):
    """`sample.stable_diffusion --model-file FILE --config-dir DIR` writes the images of the
    folder the file was written from (PNG rounding: within one 8-bit level)."""
    from PIL import Image

    from jaxdiff.pipelines import stable_diffusion as sdp
    from sample.stable_diffusion import main

    folder, file = sd1_file
    pipe, params = sd
    latents = _latents(4)
    np.save(tmp_path / "latents.npy", latents.numpy())
    paths = main(["--model-file", str(file), "--config-dir", str(folder), "--prompt", PROMPTS[0],
                  "--steps", str(STEPS), "--latents", str(tmp_path / "latents.npy"), "--dtype", "fp32",
                  "--devices", "one", "--no-compile-cache", "--out", str(tmp_path / "out")])
    ids, neg = sdp.tokenize_prompts(pipe, [PROMPTS[0]] * 2, "")
    config = sdp.GenerateConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    want = sdp.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, config=config, latents=nhwc(latents))
    got = np.stack([np.asarray(Image.open(p), np.float32) / 255 for p in paths])
    np.testing.assert_allclose(got, np.asarray(want), atol=1 / 255 + 1e-6)
