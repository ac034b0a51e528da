"""Single-file Stable Diffusion checkpoints (the original CompVis/Stability layout) → a pipeline.

    pipe, params = load_single_file("v1-5-pruned-emaonly.safetensors", dtype=jnp.bfloat16)
    pipe, params = load_single_file("v2-1_768-ema-pruned.safetensors")         # SD 2.x, v-prediction
    pipe, params = load_single_file("my-model.safetensors", config_dir="my-pipeline-configs/")
    pipe, params = load_single_file("sd_xl_base_1.0.safetensors")   # → (sdxl.StableDiffusionXL, params)

One `.safetensors` file holds `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.*` (SD 1.x: transformers' CLIP text model; SD 2.x: an OpenCLIP text tower), or
for SDXL `conditioner.embedders.*` (base: 0 = CLIP ViT-L in transformers' names, 1 = OpenCLIP bigG
with its `text_projection`; refiner: 0 = bigG only), which load as `jaxdiff.pipelines.sdxl`
objects (`StableDiffusionXL`, params `{"unet", "vae", "text_encoder_2"[, "text_encoder"]}`).
The family is read from the keys as diffusers' `infer_diffusers_model_type` does (SD 2.x: the
cross-attention width 1024); its diffusers configs and the CLIP tokenizer ship with jaxdiff
(`jaxdiff/model_configs`: stable-diffusion-v1-5, stable-diffusion-2-1 (v-prediction, 768 px), and
with `prediction_type="epsilon"` stable-diffusion-2-1-base; sdxl-base, sdxl-refiner), so nothing
is downloaded.
`config_dir` — a diffusers pipeline folder without weights (`model_index.json`, component
configs, tokenizer) — serves other models, as `from_single_file(..., config=DIR)` does.

Names are converted by rule (`ldm_unet_name`, `ldm_vae_name`, the OpenCLIP split in
`jaxdiff.models.clip`) and tensors are read one at a time from the file, per component, onto the
modules' parameter templates (`jaxdiff.weights.torch_state_to_flax`: every parameter filled,
every tensor of a component used). PyTorch pickles (`.ckpt`, `.pt`, `.bin`, `.pth`) are refused:
nothing in jaxdiff unpickles.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError

CONFIGS = Path(__file__).resolve().parent / "model_configs"
TOKENIZER_DIR = CONFIGS / "clip_tokenizer"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# LDM training buffers and EMA copies a checkpoint may carry beside the weights.
_IGNORED_TOP = re.compile(r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|log_one_minus_\w+|"
                          r"posterior_\w+|logvar|model_ema\..*|first_stage_model\.loss\..*|"
                          r"lvlb_weights|denoiser\.(log_)?sigmas|"  # SDXL (sgm) files: the denoiser's sigma buffer
                          r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids)$")

FAMILIES = {"sd-v1": "SD 1.x", "sd-v2": "SD 2.x (v-prediction, 768 px)",
            "sd-v2-base": "SD 2.x (epsilon, 512 px)", "sdxl-base": "SDXL base (1024 px)",
            "sdxl-refiner": "SDXL refiner (img2img, aesthetic score)"}
SDXL_PREFIX = "conditioner.embedders."
# SDXL base: embedders.0 = CLIP ViT-L (transformers layout), embedders.1 = OpenCLIP bigG; the
# refiner: embedders.0 = OpenCLIP bigG only (diffusers' CHECKPOINT_KEY_NAMES xl_base / xl_refiner).
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BASE_OPEN_CLIP = "conditioner.embedders.1.model."
SDXL_REFINER_OPEN_CLIP = "conditioner.embedders.0.model."


# --------------------------------------------------------------------------------------------
# The file and its family
# --------------------------------------------------------------------------------------------

def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """The path of a readable `.safetensors` file; pickles get one line naming the alternative."""
    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise JaxdiffError(f"{p} is a PyTorch pickle ({p.suffix}), which jaxdiff never unpickles (loading "
                           "one can run arbitrary code); use the model's .safetensors file (most releases "
                           "publish one beside the .ckpt)")
    if not p.is_file():
        raise JaxdiffError(f"model file {p} does not exist")
    if p.suffix.lower() != ".safetensors":
        raise JaxdiffError(f"{p} is not a .safetensors file; single-file checkpoints are read from safetensors")
    return p


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the file's (validated) header."""
    with open(path, "rb") as f:
        entries, _ = W.read_safetensors_header(f, path, path.stat().st_size)
    return {name: shape for name, (_, shape, _, _) in entries.items()}


def detect_family(shapes: dict[str, tuple[int, ...]], prediction_type: str | None = None,
                  source: str = "the file") -> str:
    """"sd-v1", "sd-v2" (v-prediction), "sd-v2-base" (`prediction_type="epsilon"`), "sdxl-base"
    (OpenCLIP bigG as `conditioner.embedders.1`) or "sdxl-refiner" (bigG as `embedders.0`), from
    the keys as diffusers' `infer_diffusers_model_type` reads them."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise JaxdiffError(f"prediction type {prediction_type!r}; choose one of: epsilon, v_prediction")
    if any(k.startswith(SDXL_PREFIX) for k in shapes):
        if not any(k.startswith(UNET_PREFIX) for k in shapes):
            raise JaxdiffError(f"{source} has text encoders (conditioner.embedders.*) but no "
                               "model.diffusion_model.* (UNet) tensors: not a full SDXL checkpoint")
        conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
        if conv_in is not None and conv_in[1] != 4:
            raise JaxdiffError(f"{source}: its UNet takes {conv_in[1]} input channels (an SDXL inpainting "
                               "model); only text-to-image / img2img SDXL single files are supported")
        if any(k.startswith(SDXL_BASE_OPEN_CLIP) for k in shapes):
            return "sdxl-base"
        if any(k.startswith(SDXL_REFINER_OPEN_CLIP) for k in shapes):
            return "sdxl-refiner"
        raise JaxdiffError(f"{source}: conditioner.embedders.* without an OpenCLIP bigG text encoder "
                           "(embedders.1.model.* for SDXL base, embedders.0.model.* for the refiner); "
                           "not an SDXL checkpoint jaxdiff knows")
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        raise JaxdiffError(f"{source} has no model.diffusion_model.* tensors: not a single-file Stable "
                           "Diffusion checkpoint (a diffusers folder? pass it as --model-dir)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        raise JaxdiffError(f"{source}: its UNet takes {conv_in[1]} input channels (an inpainting or "
                           "instruct-pix2pix model); only text-to-image single files are supported")
    v2_key = UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    is_v2 = v2_key in shapes and shapes[v2_key][-1] == 1024
    if not is_v2:
        if prediction_type == "v_prediction":
            return "sd-v1"  # a v-prediction SD 1.x fine-tune: the scheduler is overridden
        return "sd-v1"
    return "sd-v2-base" if prediction_type == "epsilon" else "sd-v2"


def iter_selected(path: Path, select: Callable[[str], str | None]) -> Iterator[tuple[str, np.ndarray]]:
    """(new name, array) of the tensors for which `select(name)` gives a name, read one at a time."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        entries, data_start = W.read_safetensors_header(f, path, size)
        for name, (dtype, shape, start, end) in entries.items():
            new = select(name)
            if new is None:
                continue
            array = np.empty(shape, dtype)
            f.seek(data_start + start)
            if f.readinto(array.reshape(-1).view(np.uint8)) != end - start:
                raise JaxdiffError(f"{path}: tensor {name!r} is truncated; re-download the file")
            yield new, array


# --------------------------------------------------------------------------------------------
# Name conversion (original layout → diffusers names)
# --------------------------------------------------------------------------------------------

_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
           ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))
_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


def _resnet(rest: str) -> str:
    for old, new in _RESNET:
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def ldm_unet_name(name: str, layers_per_block: int) -> str | None:
    """An original UNet name (without `model.diffusion_model.`) → the diffusers name (None:
    not a UNet parameter this rule knows). Mirrors diffusers' `convert_ldm_unet_checkpoint`."""
    module, _, leaf = name.rpartition(".")
    for old, new in _UNET_TOP.items():
        if module == old:
            return f"{new}.{leaf}"
    parts = name.split(".")
    n = layers_per_block + 1
    if parts[0] == "input_blocks" and len(parts) > 3:
        i, j, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        block, layer = (i - 1) // n, (i - 1) % n
        if j == "0" and rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        if j == "0":
            return f"down_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
        if j == "1":
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
    if parts[0] == "middle_block" and len(parts) > 2:
        k, rest = int(parts[1]), ".".join(parts[2:])
        return (f"mid_block.resnets.{k // 2}.{_resnet(rest)}" if k % 2 == 0
                else f"mid_block.attentions.{k // 2}.{rest}")
    if parts[0] == "output_blocks" and len(parts) > 3:
        i, j, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        block, layer = i // n, i % n
        if j == "0":
            return f"up_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
        if j in ("1", "2") and rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.{rest}"
        if j == "1":
            return f"up_blocks.{block}.attentions.{layer}.{rest}"
    return None


_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_vae_name(name: str, num_up_blocks: int) -> str | None:
    """An original VAE name (without `first_stage_model.`) → the diffusers name (None: unknown).
    Mirrors diffusers' `convert_ldm_vae_checkpoint`."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return name
    coder, rest = parts[0], parts[1:]
    if coder not in ("encoder", "decoder"):
        return None
    if rest[0] in ("conv_in", "conv_out"):
        return name
    if rest[0] == "norm_out":
        return ".".join([coder, "conv_norm_out", *rest[1:]])
    if rest[0] == "mid" and len(rest) >= 3:
        if rest[1].startswith("block_"):
            i = int(rest[1][len("block_"):]) - 1
            tail = ".".join(rest[2:]).replace("nin_shortcut", "conv_shortcut")
            return f"{coder}.mid_block.resnets.{i}.{tail}"
        if rest[1] == "attn_1" and rest[2] in _VAE_ATTENTION:
            return f"{coder}.mid_block.attentions.0.{_VAE_ATTENTION[rest[2]]}.{'.'.join(rest[3:])}"
        return None
    if rest[0] in ("down", "up") and len(rest) >= 4:
        b = int(rest[1])
        kind = "down_blocks" if rest[0] == "down" else "up_blocks"
        b = b if rest[0] == "down" else num_up_blocks - 1 - b
        if rest[2] == "block":
            tail = ".".join(rest[3:]).replace("nin_shortcut", "conv_shortcut")
            return f"{coder}.{kind}.{b}.resnets.{tail}"
        if rest[2] in ("downsample", "upsample"):
            sampler = "downsamplers" if rest[2] == "downsample" else "upsamplers"
            return f"{coder}.{kind}.{b}.{sampler}.0.{'.'.join(rest[3:])}"
    return None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _component(path: Path, template, select, source: str, **kw) -> dict:
    """Stream the tensors `select` names onto `template`; every tensor must map."""
    return W.torch_state_to_flax(iter_selected(path, select), template, source=source, **kw)


def config_folder(family: str, config_dir: str | os.PathLike | None) -> Path:
    if config_dir is None:
        return CONFIGS / family
    root = Path(config_dir).expanduser()
    needed = {"sdxl-base": ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"),
              "sdxl-refiner": ("unet", "vae", "text_encoder_2", "scheduler")}.get(
                  family, ("unet", "vae", "text_encoder", "scheduler"))
    for sub in needed:
        if not (root / sub).is_dir():
            raise JaxdiffError(f"--config-dir {root} has no {sub}/ folder: pass a diffusers pipeline folder "
                               "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; "
                               "the weights are not needed)")
    return root


def load_family_tokenizer(folder: Path, subfolder: str = "tokenizer"):
    """The tokenizer of a config folder: its own files, or jaxdiff's CLIP vocabulary with the
    folder's `tokenizer_config.json` settings (the pad token: SDXL's tokenizer_2 pads with "!")."""
    from transformers import CLIPTokenizer

    from jaxdiff.tokenizer import load_tokenizer

    tok_dir = folder / subfolder
    if (tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file():
        return load_tokenizer(folder, subfolder=subfolder)
    settings = W.read_json(tok_dir / "tokenizer_config.json") if (tok_dir / "tokenizer_config.json").is_file() else {}
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=settings.get("pad_token", "<|endoftext|>"))


def load_single_file(file: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
                     prediction_type: str | None = None, dtype=jnp.bfloat16, param_dtype=None,
                     vae_dtype=None, text_encoder_dtype=jnp.float32, scheduler=None):
    """`(StableDiffusion, params)` from a single original-layout `.safetensors` checkpoint
    (SDXL base / refiner files: `(sdxl.StableDiffusionXL, params)`, as `load_sdxl_pipeline`).

    config_dir: a diffusers pipeline folder whose configs (and tokenizer) describe the model
        (default: the shipped configs of the detected family). prediction_type: "epsilon" or
        "v_prediction" overrides the scheduler's (SD 2.x defaults to v-prediction, as
        stable-diffusion-2-1; "epsilon" picks the 2-1-base configs). Other arguments as
        `stable_diffusion.load_pipeline`."""
    from jaxdiff.models import clip as clip_lib
    from jaxdiff.pipelines import stable_diffusion as sd

    path = check_checkpoint_file(file)
    shapes = read_shapes(path)
    family = detect_family(shapes, prediction_type, str(path))
    folder = config_folder(family, config_dir)
    if family.startswith("sdxl"):
        return _load_sdxl(path, shapes, family, folder, prediction_type=prediction_type, dtype=dtype,
                          param_dtype=param_dtype, vae_dtype=vae_dtype,
                          text_encoder_dtype=text_encoder_dtype, scheduler=scheduler)

    unknown = [k for k in shapes if not k.startswith((UNET_PREFIX, *VAE_PREFIXES, "cond_stage_model."))
               and not _IGNORED_TOP.match(k)]
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise JaxdiffError(f"{path}: tensors {', '.join(unknown[:3])}{more} belong to no Stable Diffusion "
                           "component; this is not an SD 1.x/2.x single-file checkpoint")

    unet, unet_params = _load_unet(path, folder, dtype, param_dtype)
    vae, vae_params = _load_vae(path, shapes, folder, dtype, vae_dtype)

    # Text encoder
    _, te_raw = W.read_config(folder, "text_encoder")
    te_config = clip_lib.CLIPTextConfig.from_dict(te_raw.get("text_config", te_raw))
    te_dtype = text_encoder_dtype or dtype
    text_encoder = clip_lib.build_model("CLIPTextModel", te_config, te_dtype)
    te_template = clip_lib.param_shapes(text_encoder)
    te_pdt = param_dtype or te_dtype
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in shapes):
        te_params = W.torch_state_to_flax(
            _open_clip_text(path, te_config.num_hidden_layers), te_template, source=f"{path} (text encoder)",
            dtype=te_pdt)
    elif any(k.startswith(CLIP_PREFIX) for k in shapes):
        def te_select(name):
            if not name.startswith(CLIP_PREFIX) or _IGNORED_TOP.match(name):
                return None
            return name[len(CLIP_PREFIX):]

        te_params = _component(path, te_template, te_select, f"{path} (text encoder)", dtype=te_pdt,
                               rename=lambda n: n if n.startswith("text_model.") else "text_model." + n,
                               ignore=lambda n: n.endswith("position_ids"))
    else:
        raise JaxdiffError(f"{path} has no cond_stage_model.* (text encoder) tensors; jaxdiff needs a full "
                           "checkpoint (UNet, VAE and text encoder)")

    sched = _scheduler(folder, scheduler, prediction_type)
    tokenizer = load_family_tokenizer(folder)
    pipe = sd.StableDiffusion(unet, vae, text_encoder, tokenizer, sched, folder)
    params = {"unet": sd._to_device(unet_params), "vae": sd._to_device(vae_params),
              "text_encoder": sd._to_device(te_params)}
    sd._check_compatible(path, unet.config, vae.config, text_encoder.config)
    return pipe, params


def _load_unet(path: Path, folder: Path, dtype, param_dtype):
    from jaxdiff.models import unet_2d_condition as unet_lib

    _, unet_raw = W.read_config(folder, "unet", expect_class=unet_lib.UNET_CLASSES)
    unet = unet_lib.UNet2DConditionModel(unet_lib.UNet2DConditionConfig.from_dict(unet_raw), dtype=dtype)
    pdt = param_dtype or dtype
    lpb = unet.config.layers_per_block
    lpb = lpb if isinstance(lpb, int) else lpb[0]

    def unet_select(name):
        if not name.startswith(UNET_PREFIX):
            return None
        new = ldm_unet_name(name[len(UNET_PREFIX):], lpb)
        return new if new is not None else name  # reported as unused by the loader

    return unet, _component(path, unet_lib.param_shapes(unet, pdt), unet_select, f"{path} (UNet)", dtype=pdt)


def _load_vae(path: Path, shapes: dict, folder: Path, dtype, vae_dtype):
    from jaxdiff.models import autoencoder_kl as vae_lib

    _, vae_raw = W.read_config(folder, "vae", expect_class=vae_lib.VAE_CLASSES)
    vae_config = vae_lib.AutoencoderKLConfig.from_dict(vae_raw)
    vdt = vae_dtype or vae_lib.decode_dtype(vae_config, dtype)
    vae = vae_lib.AutoencoderKL(vae_config, dtype=vdt)
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in shapes)), None)
    if prefix is None:
        raise JaxdiffError(f"{path} has no first_stage_model.* (VAE) tensors; jaxdiff needs a full "
                           "checkpoint (UNet, VAE and text encoder)")
    n_up = len(vae_config.up_block_types)

    def vae_select(name):
        if not name.startswith(prefix) or _IGNORED_TOP.match(name):
            return None
        new = ldm_vae_name(name[len(prefix):], n_up)
        return new if new is not None else name

    return vae, _component(path, vae_lib.param_shapes(vae, vdt), vae_select, f"{path} (VAE)", dtype=vdt)


def _scheduler(folder: Path, scheduler, prediction_type):
    from jaxdiff.schedulers import Scheduler, create_scheduler

    if isinstance(scheduler, Scheduler):
        return scheduler
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    return create_scheduler(folder / "scheduler", name=scheduler, **overrides)


def _load_sdxl(path: Path, shapes: dict, family: str, folder: Path, *, prediction_type, dtype, param_dtype,
               vae_dtype, text_encoder_dtype, scheduler):
    """`(StableDiffusionXL, params)` of an SDXL base or refiner file (see `load_single_file`)."""
    from jaxdiff.models import clip as clip_lib
    from jaxdiff.pipelines import sdxl

    refiner = family == "sdxl-refiner"
    open_clip = SDXL_REFINER_OPEN_CLIP if refiner else SDXL_BASE_OPEN_CLIP
    known = (UNET_PREFIX, *VAE_PREFIXES, open_clip) + (() if refiner else (SDXL_CLIP_PREFIX,))
    unknown = [k for k in shapes if not k.startswith(known) and not _IGNORED_TOP.match(k)
               and not k.endswith("position_ids")]
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise JaxdiffError(f"{path}: tensors {', '.join(unknown[:3])}{more} belong to no {FAMILIES[family]} "
                           "component; this is not an SDXL single-file checkpoint jaxdiff knows")
    index = W.read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}

    unet, unet_params = _load_unet(path, folder, dtype, param_dtype)
    vae, vae_params = _load_vae(path, shapes, folder, dtype, vae_dtype)
    te_dtype = text_encoder_dtype or dtype
    te_pdt = param_dtype or te_dtype
    params = {"unet": unet_params, "vae": vae_params}

    text_encoder = tokenizer = None
    if not refiner:
        _, raw = W.read_config(folder, "text_encoder")
        text_encoder = clip_lib.build_model("CLIPTextModel", clip_lib.CLIPTextConfig.from_dict(
            raw.get("text_config", raw)), te_dtype)

        def te_select(name):
            if not name.startswith(SDXL_CLIP_PREFIX) or name.endswith("position_ids"):
                return None
            return name[len(SDXL_CLIP_PREFIX):]

        params["text_encoder"] = _component(
            path, clip_lib.param_shapes(text_encoder), te_select, f"{path} (text encoder)", dtype=te_pdt,
            rename=lambda n: n if n.startswith("text_model.") else "text_model." + n)
        tokenizer = load_family_tokenizer(folder, "tokenizer")

    _, raw = W.read_config(folder, "text_encoder_2")
    te2_config = clip_lib.CLIPTextConfig.from_dict(raw.get("text_config", raw))
    text_encoder_2 = clip_lib.build_model("CLIPTextModelWithProjection", te2_config, te_dtype)
    params["text_encoder_2"] = W.torch_state_to_flax(
        _open_clip_text(path, te2_config.num_hidden_layers, open_clip, keep_projection=True),
        clip_lib.param_shapes(text_encoder_2), source=f"{path} (text encoder 2)", dtype=te_pdt)
    tokenizer_2 = load_family_tokenizer(folder, "tokenizer_2")

    pipe = sdxl.StableDiffusionXL(
        unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
        _scheduler(folder, scheduler, prediction_type), folder,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", not refiner)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", refiner)))
    params = {k: sdxl._to_device(v) for k, v in params.items()}
    sdxl._check_compatible(pipe)
    return pipe, params


def pipeline_class(file: str | os.PathLike, prediction_type: str | None = None) -> str:
    """The diffusers pipeline class a single file loads as (what `sample.stable_diffusion`
    dispatches on): StableDiffusionPipeline, StableDiffusionXLPipeline or
    StableDiffusionXLImg2ImgPipeline (the refiner)."""
    path = check_checkpoint_file(file)
    family = detect_family(read_shapes(path), prediction_type, str(path))
    return {"sdxl-base": "StableDiffusionXLPipeline",
            "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}.get(family, "StableDiffusionPipeline")


def _open_clip_text(path: Path, num_layers: int, prefix: str = OPEN_CLIP_PREFIX,
                    keep_projection: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """The OpenCLIP text tower of a file as transformers names, layers ≥ `num_layers` (SD 2.x's
    last block: diffusers' text encoder stops at the penultimate layer) and the logit scale left
    out, as diffusers' `convert_open_clip_checkpoint` does; the projection (stored as `x @ P`)
    becomes `text_projection.weight` = Pᵀ with `keep_projection` (SDXL's bigG), else it is dropped."""
    from jaxdiff.models.clip import open_clip_to_transformers

    def select(name):
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix):]
        m = re.match(r"transformer\.resblocks\.(\d+)\.", rest)
        if (m and int(m.group(1)) >= num_layers) or rest == "logit_scale":
            return None
        if rest == "text_projection" and not keep_projection:
            return None
        return rest

    yield from open_clip_to_transformers(iter_selected(path, select))
