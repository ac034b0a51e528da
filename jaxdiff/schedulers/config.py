"""`create_scheduler`: a scheduler from a name, keyword arguments or a diffusers
`scheduler_config.json` (file, folder, pipeline folder or dict)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.schedulers.base import Scheduler

# Every __init__ argument of a diffusers (0.42) scheduler class, plus keys of older configs.
# A config may carry any of these (e.g. a PNDM config's `skip_prk_steps` read as DDIM): when the
# target scheduler has no such field the key is dropped, as diffusers' `from_config` does.
DIFFUSERS_SCHEDULER_KEYS = frozenset("""
algorithm_type alpha_cum_end alpha_cum_start base_image_seq_len base_shift beta_end beta_max
beta_min beta_schedule beta_start block_length clip_denoised clip_sample clip_sample_range
correct_steps corrector_k corrector_order corrector_selection corrector_selection_tau
corrector_steps disable_corrector dynamic_thresholding_ratio editing_threshold entropy_bound eps
eta euler_at_final final_sigmas_type final_step_size_scale flow_shift gamma gamma_cum_end
gamma_cum_start interpolation_type invert_sigmas lambda_min_clipped lower_order_final
mask_token_id masking_schedule max_image_seq_len max_shift minimal_topk n_grid noise_mode
num_inference_steps num_policy_substeps num_train_timesteps num_vec_classes
original_inference_steps predict_x0 prediction_type predictor_order rescale_betas_zero_snr rho s
s_churn s_max s_min s_noise sample_max_value sampling_eps scale_factors scaler schedule_mode
scheduler_type set_alpha_to_one shift shift_terminal sigma_data sigma_max sigma_min
sigma_schedule skip_prk_steps snr snr_shift_scale solver_order solver_p solver_type stage_range
stages steps_offset stochastic_sampling t_lim_ode t_lim_ode_below t_max t_min
tail_step_multiplier tail_steps tau_func threshold thresholding time_shift_type
timestep_scaling timestep_spacing timestep_type trained_betas tsr_k tsr_sigma upscale_mode
use_beta_sigmas use_dynamic_shifting use_exponential_sigmas use_flow_sigmas use_karras_sigmas
use_lu_lambdas variance_type
tensor_format predict_epsilon
""".split())

_REGISTRY: dict[str, type[Scheduler]] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[Scheduler], *aliases: str) -> type[Scheduler]:
    _REGISTRY[cls.name] = cls
    for a in (cls.diffusers_class, "Flax" + cls.diffusers_class, *aliases):
        _ALIASES[a.lower()] = cls.name
    return cls


def scheduler_names() -> tuple[str, ...]:
    """The jaxdiff names of the registered schedulers, in registration order."""
    return tuple(_REGISTRY)


def scheduler_class(name: str) -> type[Scheduler]:
    """The class for a jaxdiff name ('ddim', 'dpm++', ...) or a diffusers class name."""
    key = str(name).strip()
    key = _ALIASES.get(key.lower(), key.lower())
    if key not in _REGISTRY:
        raise unknown_choice("scheduler", name, list(_REGISTRY))
    return _REGISTRY[key]


def read_scheduler_config(path: str | os.PathLike) -> dict:
    """The dict in a `scheduler_config.json`: the file itself, a folder holding it, or a
    pipeline folder with a `scheduler/` subfolder."""
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
            if cand.is_file():
                p = cand
                break
        else:
            raise JaxdiffError(f"no scheduler_config.json in {p} or {p / 'scheduler'}; "
                               "pass a diffusers scheduler or pipeline folder")
    elif not p.is_file():
        raise JaxdiffError(f"scheduler config {p} does not exist")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxdiffError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise JaxdiffError(f"{p} must hold a JSON object of scheduler options")
    return cfg


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _coerce(field: dataclasses.Field, value):
    """JSON/keyword values → the field's type, with one clear error for a wrong type."""
    if value is None:
        return None
    default = field.default
    name = field.name
    if default is None and "float" in str(field.type):  # optional numbers (sigma_min, ...)
        default = 0.0
    if field.name == "trained_betas":
        try:
            return tuple(float(b) for b in value)
        except (TypeError, ValueError):
            raise JaxdiffError(f"{name} must be a list of floats, got {value!r}") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise JaxdiffError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise JaxdiffError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JaxdiffError(f"{name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise JaxdiffError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _normalise(cls: type[Scheduler], config: Mapping[str, Any], *, strict: bool) -> dict:
    """Keep the keys `cls` knows. Keys of other diffusers schedulers are dropped; diffusers keys
    of `cls` that jaxdiff does not implement must hold their default; anything else is an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    config = dict(config)
    if "predict_epsilon" in config:  # diffusers < 0.10 DDPM configs
        pe = config.pop("predict_epsilon")
        if "prediction_type" not in config and pe is False:
            config["prediction_type"] = "sample"
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in fields:
            out[key] = _coerce(fields[key], value)
        elif key in cls._unsupported:
            if value != cls._unsupported[key] and value is not None:
                raise JaxdiffError(f"{key}={value!r} is not supported by jaxdiff's "
                                   f"{cls.name} scheduler; use {key}={cls._unsupported[key]!r}")
        elif key in DIFFUSERS_SCHEDULER_KEYS and not strict:
            continue
        else:
            raise unknown_choice(f"{cls.name} scheduler option", key, sorted(fields))
    return out


def create_scheduler(config: str | os.PathLike | Mapping[str, Any] | None = None,
                     name: str | None = None, **overrides) -> Scheduler:
    """A scheduler from a name, a diffusers config (dict, `scheduler_config.json`, its folder or
    a pipeline folder) and/or keyword overrides.

        create_scheduler("ddim")                                   # diffusers' defaults
        create_scheduler("ddpm", beta_schedule="squaredcos_cap_v2")
        create_scheduler("path/to/sd-pipeline")                    # class from `_class_name`
        create_scheduler("path/to/sd-pipeline", name="dpm++")      # same betas, another sampler

    `name` switches the sampler while keeping the config's schedule and prediction type (like
    diffusers' `X.from_config(other.config)`). Unknown option names or values raise JaxdiffError.
    """
    cfg: dict = {}
    source = "arguments"
    if isinstance(config, Mapping):
        cfg, source = dict(config), "config"
    elif config is not None:
        text = os.fspath(config)
        looks_like_path = os.sep in text or text.endswith(".json") or Path(text).expanduser().exists()
        if not looks_like_path and name is None:
            name = text
        elif looks_like_path:
            cfg, source = read_scheduler_config(text), str(text)
        else:
            raise JaxdiffError(f"{text!r} is neither a scheduler folder nor a config file")
    if name is None:
        cls_name = cfg.get("_class_name")
        if not cls_name:
            raise JaxdiffError(f"no scheduler named: pass name= (one of {', '.join(_REGISTRY)}) "
                               "or a config with `_class_name`")
        if str(cls_name).lower() not in _ALIASES:
            known = sorted({c.diffusers_class for c in _REGISTRY.values()})
            raise JaxdiffError(f"{source}: scheduler class {cls_name!r} is not implemented in "
                               f"jaxdiff; choose one of: {', '.join(known)} (or pass name=)")
    cls = scheduler_class(name if name is not None else cfg["_class_name"])
    try:
        kwargs = _normalise(cls, cfg, strict=False)
    except JaxdiffError as e:
        raise JaxdiffError(f"{source}: {e}") from None
    override_kwargs = _normalise(cls, overrides, strict=True)
    if not cfg:
        return cls(**override_kwargs)
    cls(**{k: v for k, v in override_kwargs.items() if k != "trained_betas"})  # bad arguments: no path prefix
    try:
        return cls(**{**kwargs, **override_kwargs})
    except JaxdiffError as e:
        raise JaxdiffError(f"{source}: {e}") from None
