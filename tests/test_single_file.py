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
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
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
    with pytest.raises(JaxdiffError, match="no model.diffusion_model"):
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


# ------------------------------------------------------------------------------------------------
# SDXL base and refiner single files
# ------------------------------------------------------------------------------------------------

_XL_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "norm_num_groups": 8, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 8}
XL_BASE_UNET = dict(_XL_UNET, block_out_channels=(32, 32, 64), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=80,
                    projection_class_embeddings_input_dim=6 * 8 + 32)
XL_REFINER_UNET = dict(_XL_UNET, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(2, 4, 4, 4), transformer_layers_per_block=(1, 2, 1, 1),
                       cross_attention_dim=48, projection_class_embeddings_input_dim=5 * 8 + 32)
XL_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "steps_offset": 1, "timestep_spacing": "leading"}


def _xl_text_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{"bos_token_id": 521, "eos_token_id": 522, "pad_token_id": 1, "hidden_size": 32,
                             "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3,
                             "vocab_size": 523, "hidden_act": "gelu", "projection_dim": 32, **kw})


def build_sdxl_folders(root, fixtures_dir):
    """A tiny SDXL base and refiner (SDXL's block layouts, both encoders, tokenizer_2 padding with
    "!", the tiny SD fixture's VAE and vocabulary) saved by diffusers: (base dir, refiner dir)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    fixture = fixtures_dir / "tiny-sd-pt-v1"
    torch.manual_seed(0)
    te1 = perturb(CLIPTextModel(_xl_text_config()).eval())
    # bigG's stand-in is wider than ViT-L's (48 vs 32; context 80 = 32 + 48), as in SDXL, where
    # diffusers' from_single_file tells the two encoders apart by width.
    te2 = perturb(CLIPTextModelWithProjection(_xl_text_config(eos_token_id=2, hidden_size=48)).eval())
    tok = CLIPTokenizer.from_pretrained(fixture / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(fixture / "tokenizer", pad_token="!")
    vae = AutoencoderKL.from_pretrained(fixture / "vae").eval()
    sched = EulerDiscreteScheduler(**XL_SCHEDULER)
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=perturb(UNet2DConditionModel(**XL_BASE_UNET).eval()), scheduler=sched,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2,
        unet=perturb(UNet2DConditionModel(**XL_REFINER_UNET).eval()), scheduler=sched,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    base.save_pretrained(root / "base")
    refiner.save_pretrained(root / "refiner")
    return root / "base", root / "refiner"


def write_sdxl_single_file(folder, path):
    """An SDXL diffusers folder as one original-layout file: `conditioner.embedders.0.transformer.*`
    (CLIP ViT-L, transformers names; base only) and OpenCLIP bigG (`embedders.1.model.*` for a base,
    `embedders.0.model.*` for a refiner) with `text_projection` stored as `x @ P`."""
    from diffusers import DiffusionPipeline
    from safetensors.numpy import save_file

    pipe = DiffusionPipeline.from_pretrained(folder)
    ucfg = pipe.unet.config
    up_attn = ["CrossAttn" in t for t in ucfg.up_block_types]
    tensors = {"model.diffusion_model." + unet_to_ldm(k, ucfg.layers_per_block, up_attn): v.numpy()
               for k, v in pipe.unet.state_dict().items()}
    for k, v in pipe.vae.state_dict().items():
        name, value = vae_to_ldm(k, v.numpy(), len(pipe.vae.config.up_block_types))
        tensors["first_stage_model." + name] = value
    if pipe.text_encoder is not None:
        for k, v in pipe.text_encoder.state_dict().items():
            k = k if k.startswith("text_model.") else "text_model." + k  # the original's names
            tensors["conditioner.embedders.0.transformer." + k] = v.numpy()
    te2 = {k: v.numpy() for k, v in pipe.text_encoder_2.state_dict().items()}
    projection = te2.pop("text_projection.weight")
    big_g = open_clip_from_transformers(te2, np.random.default_rng(0))
    big_g["text_projection"] = projection.T
    prefix = "conditioner.embedders.0.model." if pipe.text_encoder is None else "conditioner.embedders.1.model."
    tensors.update({prefix + k: v for k, v in big_g.items()})
    tensors["denoiser.sigmas"] = np.linspace(14.6, 0.03, 1000).astype(np.float32)  # sgm's buffer
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def test_sdxl_family_is_detected_from_the_keys():
    """SDXL base (bigG as embedders.1), refiner (bigG as embedders.0), SD 2.x unchanged; the
    shipped configs are SDXL's (2.567 B-parameter base UNet) and tokenizer_2 pads with "!"."""
    from jaxdiff.models import unet_2d_condition as unet_lib
    from jaxdiff.tokenizer import tokenize

    unet = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048)}
    base = dict(unet, **{"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
                         "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
                         "conditioner.embedders.1.model.text_projection": (1280, 1280)})
    refiner = dict(unet, **{"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
                            "conditioner.embedders.0.model.text_projection": (1280, 1280)})
    v2 = {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
          "cond_stage_model.model.positional_embedding": (77, 1024)}
    assert S.detect_family(base) == "sdxl-base" and S.detect_family(base, "epsilon") == "sdxl-base"
    assert S.detect_family(refiner) == "sdxl-refiner"
    assert S.detect_family(v2) == "sd-v2"
    with pytest.raises(JaxdiffError, match="9 input channels"):
        S.detect_family(dict(base, **{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}))
    with pytest.raises(JaxdiffError, match="OpenCLIP bigG"):
        S.detect_family(dict(unet, **{"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)}))

    for family, n_ids in (("sdxl-base", 6), ("sdxl-refiner", 5)):
        _, raw = S.W.read_config(S.CONFIGS / family, "unet")
        cfg = unet_lib.UNet2DConditionConfig.from_dict(raw)
        assert cfg.projection_class_embeddings_input_dim == n_ids * 256 + 1280
    _, raw = S.W.read_config(S.CONFIGS / "sdxl-base", "unet")
    shapes = unet_lib.param_shapes(unet_lib.UNet2DConditionModel(unet_lib.UNet2DConditionConfig.from_dict(raw)),
                                   jnp.float32)
    assert abs(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) / 1e9 - 2.567) < 0.001
    tok2 = S.load_family_tokenizer(S.CONFIGS / "sdxl-base", "tokenizer_2")
    tok1 = S.load_family_tokenizer(S.CONFIGS / "sdxl-base", "tokenizer")
    assert tokenize(tok2, ["a photo of a cat"], 77)[0, 7] == 0 and tokenize(tok1, ["a photo of a cat"], 77)[0, 7] == 49407


@pytest.fixture(scope="module")
def sdxl_files(fixtures_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-single")
    base_dir, refiner_dir = build_sdxl_folders(root, fixtures_dir)
    return (base_dir, write_sdxl_single_file(base_dir, root / "base.safetensors"),
            refiner_dir, write_sdxl_single_file(refiner_dir, root / "refiner.safetensors"))


def _xl_noise(shape, seed):
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy().transpose(0, 2, 3, 1).copy()


@pytest.mark.extended
def test_sdxl_base_and_refiner_single_files_match_from_single_file(sdxl_files):
    """Both files load to the folder's params leaf for leaf and give diffusers'
    `from_single_file(config=folder)` images within 5e-4 (base txt2img; refiner img2img)."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from jaxdiff.pipelines import sdxl

    base_dir, base_file, refiner_dir, refiner_file = sdxl_files
    pipe, params = S.load_single_file(base_file, config_dir=base_dir, dtype=jnp.float32)
    assert isinstance(pipe, sdxl.StableDiffusionXL) and pipe.force_zeros_for_empty_prompt
    _, folder_params = sdxl.load_sdxl_pipeline(base_dir, dtype=jnp.float32)
    assert params.keys() == folder_params.keys()
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(folder_params)):
        np.testing.assert_array_equal(got, want)

    ref = StableDiffusionXLPipeline.from_single_file(str(base_file), config=str(base_dir), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    lat = _xl_noise((2, 4, 8, 8), 0)
    with torch.no_grad():
        want = ref(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=5.0, height=16,
                   width=16, latents=torch.from_numpy(lat.transpose(0, 3, 1, 2)), output_type="np").images
    got = sdxl.generate(pipe, params, sdxl.tokenize_prompts(pipe, PROMPTS, NEGATIVE),
                        sdxl.micro_conditioning(pipe, 16, 16), jax.random.key(0), 5.0,
                        config=sdxl.XLGenerateConfig(3, 16, 16), latents=lat)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)

    rpipe, rparams = S.load_single_file(refiner_file, config_dir=refiner_dir, dtype=jnp.float32)
    assert rpipe.text_encoder is None and rpipe.requires_aesthetics_score and set(rparams) == {"unet", "vae", "text_encoder_2"}
    _, folder_params = sdxl.load_sdxl_pipeline(refiner_dir, dtype=jnp.float32)
    for got, want in zip(jax.tree.leaves(rparams), jax.tree.leaves(folder_params)):
        np.testing.assert_array_equal(got, want)
    # The refiner's images: its folder's params (equal above) match diffusers' refiner img2img
    # within 5e-4 in test_sdxl (extended); here diffusers' from_single_file reads the same weights.
    ref = StableDiffusionXLImg2ImgPipeline.from_single_file(str(refiner_file), config=str(refiner_dir),
                                                             local_files_only=True)
    assert ref.text_encoder is None
    for component, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                               ("text_encoder_2", "model")):
        theirs = getattr(ref, component).state_dict()
        saved = dict(S.W.iter_safetensors(refiner_dir / component / f"{weights}.safetensors"))
        assert saved.keys() <= theirs.keys()
        for k, v in saved.items():
            np.testing.assert_array_equal(theirs[k].numpy(), v)


@pytest.mark.extended
def test_sample_program_reads_an_sdxl_model_file(sdxl_files, tmp_path, capsys):
    """`sample.stable_diffusion --model-file BASE.safetensors --config-dir DIR` runs the SDXL
    pipeline and writes the library's images (PNG rounding: within one 8-bit level)."""
    from PIL import Image

    from jaxdiff.pipelines import sdxl
    from sample.stable_diffusion import main

    base_dir, base_file, _, _ = sdxl_files
    lat = _xl_noise((1, 4, 8, 8), 5)
    np.save(tmp_path / "lat.npy", lat.transpose(0, 3, 1, 2))
    paths = main(["--model-file", str(base_file), "--config-dir", str(base_dir), "--prompt", "a cat", "--steps", "3",
                  "--guidance-scale", "5", "--dtype", "fp32", "--latents", str(tmp_path / "lat.npy"),
                  "--out", str(tmp_path / "out")])
    assert len(paths) == 1 and "sdxl" in capsys.readouterr().out
    pipe, params = sdxl.load_sdxl_pipeline(base_dir, dtype=jnp.float32)
    want = sdxl.generate(pipe, params, sdxl.tokenize_prompts(pipe, "a cat"), sdxl.micro_conditioning(pipe, 16, 16),
                         jax.random.key(0), 5.0, config=sdxl.XLGenerateConfig(3, 16, 16), latents=lat)
    got = np.asarray(Image.open(paths[0]), np.float32) / 255
    np.testing.assert_allclose(got, np.asarray(want[0]), atol=1 / 255 + 1e-6)
