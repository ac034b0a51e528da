"""Which pipeline a diffusers folder is, and what it needs: `model_index.json`'s `_class_name` → a
`PipelineSpec` (the jaxdiff module that runs it, the inputs it needs and takes, its defaults).

    spec = spec_for_folder("path/to/stable-diffusion-2-inpainting")     # the "inpaint" spec
    request = resolve(spec, Request(prompt="a cat", init_image="in.png"), folder)
    # JaxdiffError: ... holds a StableDiffusionInpaintPipeline (inpainting): it needs --mask-image ...
    module = spec.load()     # jaxdiff.pipelines.inpaint
    pipe, params = module.load_pipeline(folder, dtype=jnp.float32)
    images = module.run_request(pipe, params, request, report={})      # (N, H, W, 3) in [0, 1]

Every pipeline module named here provides

    load_pipeline(folder, *, dtype, vae_dtype=None, variant=None, scheduler=None,
                  allow_outside_paths=False) -> (pipe, params)
    run_request(pipe, params, request: Request, report: dict) -> np.ndarray (N, H, W, 3) in [0, 1]

`run_request` is what `python -m sample.stable_diffusion` calls: it reads the request's files,
runs the pipeline's one compiled program (on every local device with `pmap` when
`use_pmap(request, n)`), and puts `report["times"]` (stage → seconds) and `report["where"]`
(the devices, in words). A new pipeline is one `PipelineSpec` in `PIPELINES` and one module.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError, unknown_choice

# The request's pipeline-specific inputs: field → (flag, what it is). Fields not named here
# (prompt, steps, seed, latents, ...) every pipeline takes.
INPUTS: dict[str, tuple[str, str]] = {
    "init_image": ("--init-image", "the image to start from"),
    "mask_image": ("--mask-image", "white = repaint, black = keep"),
    "depth_map": ("--depth-map", "a depth map, .npy or 16-bit PNG"),
    "strength": ("--strength", "how much of the schedule to run, (0, 1]"),
    "noise_level": ("--noise-level", "noise added to the low-resolution image, 0..max_noise_level"),
    "refiner_dir": ("--refiner-dir", "an SDXL refiner folder that finishes the base's schedule"),
    "high_noise_frac": ("--high-noise-frac", "the part of the schedule the SDXL base runs, (0, 1)"),
    "mask_blur": ("--mask-blur", "Gaussian blur of the mask, in pixels"),
    "padding_mask_crop": ("--padding-mask-crop", "crop to the mask's box plus this margin"),
}


@dataclasses.dataclass(frozen=True)
class Request:
    """What `sample.stable_diffusion` was asked for (files as paths; None = not given)."""
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_images: int | None = None
    latents: str | None = None
    init_image: str | None = None
    mask_image: str | None = None
    depth_map: str | None = None
    strength: float | None = None
    noise_level: int | None = None
    mask_blur: float | None = None
    padding_mask_crop: int | None = None
    refiner_dir: str | None = None
    high_noise_frac: float | None = None
    devices: str = "all"  # "all": pmap when the images split evenly over the devices; "one"


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """One kind of pipeline folder.

    kind: the short name (`--pipeline KIND`). class_names: `_class_name`s of model_index.json
    (without diffusers' "Flax" prefix). module: the jaxdiff module with `load_pipeline` and
    `run_request`. required / accepted: `INPUTS` fields it needs / may take. defaults: values of
    request fields left None (diffusers' defaults for that pipeline)."""
    kind: str
    class_names: tuple[str, ...]
    description: str
    module: str
    required: tuple[str, ...] = ()
    accepted: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def load(self):
        """The pipeline's module (imported on first use)."""
        try:
            return importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            if e.name != self.module:
                raise
            raise JaxdiffError(f"{self.description} ({', '.join(self.class_names)}) is not "
                               "implemented in this jaxdiff") from None


_T2I_DEFAULTS = {"steps": 50, "guidance_scale": 7.5}

PIPELINES: tuple[PipelineSpec, ...] = (
    PipelineSpec("text-to-image", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
                 "Stable Diffusion 1.x/2.x text-to-image / img2img", "jaxdiff.pipelines.stable_diffusion",
                 accepted=("init_image", "strength"), defaults={**_T2I_DEFAULTS, "strength": 0.8}),
    PipelineSpec("inpaint", ("StableDiffusionInpaintPipeline",), "inpainting",
                 "jaxdiff.pipelines.inpaint", required=("init_image", "mask_image"),
                 accepted=("strength", "mask_blur", "padding_mask_crop"),
                 defaults={**_T2I_DEFAULTS, "strength": 1.0, "mask_blur": 0.0}),
    PipelineSpec("upscale", ("StableDiffusionUpscalePipeline",), "the x4 upscaler",
                 "jaxdiff.pipelines.upscale", required=("init_image",), accepted=("noise_level",),
                 defaults={"steps": 75, "guidance_scale": 9.0, "noise_level": 20}),
    PipelineSpec("depth", ("StableDiffusionDepth2ImgPipeline",), "depth-to-image",
                 "jaxdiff.pipelines.depth", required=("init_image",), accepted=("depth_map", "strength"),
                 defaults={**_T2I_DEFAULTS, "strength": 0.8}),
    PipelineSpec("sdxl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
                 "SDXL (two text encoders, added conditioning)", "jaxdiff.pipelines.sdxl",
                 accepted=("init_image", "strength", "refiner_dir", "high_noise_frac"),
                 defaults={"steps": 50, "guidance_scale": 5.0, "strength": 0.3}),
)
KINDS = tuple(s.kind for s in PIPELINES)


def spec_for_kind(kind: str) -> PipelineSpec:
    for spec in PIPELINES:
        if spec.kind == kind:
            return spec
    raise unknown_choice("pipeline", kind, KINDS)


def pipeline_class(folder: str | os.PathLike) -> str | None:
    """`_class_name` of the folder's model_index.json without a "Flax" prefix (None: no index)."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        return None
    name = str(W.read_json(path).get("_class_name", ""))
    return name.removeprefix("Flax")


def spec_for_class(class_name: str | None, folder: str | os.PathLike = "") -> PipelineSpec:
    """The spec of a `_class_name` (None, a folder without model_index.json: text-to-image)."""
    if class_name is None:
        return PIPELINES[0]
    for spec in PIPELINES:
        if class_name in spec.class_names:
            return spec
    known = ", ".join(n for s in PIPELINES for n in s.class_names)
    raise JaxdiffError(f"{folder or 'the folder'} holds a {class_name or 'pipeline without _class_name'}, "
                       f"which jaxdiff does not run; it runs: {known}")


def spec_for_folder(folder: str | os.PathLike) -> PipelineSpec:
    """The spec that runs a diffusers pipeline folder, from its model_index.json."""
    return spec_for_class(pipeline_class(folder), folder)


def resolve(spec: PipelineSpec, request: Request, folder: str | os.PathLike = "",
            class_name: str | None = None) -> Request:
    """`request` checked against what `spec` needs (one JaxdiffError line naming the flag) and
    with the spec's defaults filled in."""
    held = f"{folder} holds a {class_name or spec.class_names[0]} ({spec.description})"
    for field in spec.required:
        if getattr(request, field) is None:
            flag, what = INPUTS[field]
            raise JaxdiffError(f"{held}: it needs {flag} ({what})")
    for field, (flag, _) in INPUTS.items():
        if getattr(request, field) is not None and field not in spec.required + spec.accepted:
            users = [s.kind for s in PIPELINES if field in s.required + s.accepted]
            hint = f"; {flag} is for {' / '.join(users)} pipelines"
            if spec.kind == "text-to-image" and "inpaint" in users:
                hint += " (pass --pipeline inpaint to inpaint with this folder's UNet)"
            raise JaxdiffError(f"{held}, which takes no {flag}{hint}")
    filled = {k: v for k, v in spec.defaults.items() if getattr(request, k) is None}
    return dataclasses.replace(request, **filled)


def use_pmap(request: Request, num_images: int, device_count: int) -> bool:
    """Whether `run_request` should `pmap` over the local devices."""
    return request.devices == "all" and device_count > 1 and num_images % device_count == 0


def describe_devices(parallel: bool, device_count: int) -> str:
    import jax

    return f"{device_count} devices (pmap)" if parallel else f"1 device ({jax.devices()[0].platform})"


__all__ = [
    "INPUTS",
    "KINDS",
    "PIPELINES",
    "PipelineSpec",
    "Request",
    "describe_devices",
    "pipeline_class",
    "resolve",
    "spec_for_class",
    "spec_for_folder",
    "spec_for_kind",
    "use_pmap",
]
