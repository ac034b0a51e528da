"""Training LoRA adapters: a trainable tree of factors beside a frozen base, and export to the
files diffusers (PEFT layout) and kohya tools read.

    lora = init_lora(unet_params, rank=8, targets=DEFAULT_TARGETS, key=key)   # {path: {"a", "b"}}
    loss = lora_loss(unet_loss, alpha / rank)        # loss(lora, batch, key); batch["encoders"]["unet"] = base
    save_peft(RUN / "pytorch_lora_weights.safetensors", lora, rank=8, alpha=8)

The base UNet params travel as a frozen, shared batch entry (`batch["encoders"]["unet"]`, as the
frozen VAE and text encoder already do), so the train state — params and optimizer state — holds
only the adapters. `b` starts at zero (PEFT's init), so step 0 is the base model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import weights as W
from jaxdiff.adapters.lora import module_index
from jaxdiff.errors import JaxdiffError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py


def target_paths(unet_params: Mapping, targets: Sequence[str]) -> dict[str, str]:
    """{Flax kernel path: PyTorch module name} of the kernels whose module name ends in one of
    `targets` (PEFT's `target_modules` rule: the whole name or a '.'-separated suffix)."""
    out = {}
    for name, path in module_index(unet_params).items():
        if any(name == t or name.endswith("." + t) for t in targets):
            out["/".join(path)] = name
    if not out:
        raise JaxdiffError(f"--lora-targets {', '.join(targets)} match no layer of the UNet; use module "
                           "names such as to_q, to_k, to_v, to_out.0, proj_in, ff.net.2, conv1")
    return out


def init_lora(unet_params: Mapping, rank: int, targets: Sequence[str], key: jax.Array,
              dtype=jnp.float32) -> dict:
    """Factors for every target kernel: `a` (…, in, r) ~ U(±1/sqrt(fan_in)) (PEFT's Kaiming init),
    `b` (r, out) zeros."""
    if rank < 1:
        raise JaxdiffError(f"--lora-rank must be >= 1, got {rank}")
    flat = W.flatten(unet_params)
    paths = sorted(target_paths(unet_params, targets))
    keys = jax.random.split(key, len(paths))
    lora = {}
    for k, path in zip(keys, paths):
        shape = tuple(flat[tuple(path.split("/"))].shape)
        fan_in = math.prod(shape[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        lora[path] = {"a": jax.random.uniform(k, shape[:-1] + (rank,), dtype, -bound, bound),
                      "b": jnp.zeros((rank, shape[-1]), dtype)}
    return lora


def apply_lora(unet_params: Mapping, lora: Mapping, scale) -> dict:
    """`unet_params` with W + scale · a @ b at every adapted kernel (traced; W's dtype kept)."""
    from jaxdiff.adapters.apply import _get, _set

    out = dict(unet_params)
    for path, f in lora.items():
        w = _get(out, path)
        r = f["a"].shape[-1]
        d = (f["a"].astype(jnp.float32).reshape(-1, r) @ f["b"].astype(jnp.float32)).reshape(w.shape)
        out = _set(out, path, (w.astype(jnp.float32) + scale * d).astype(w.dtype))
    return out


def lora_loss(unet_loss: Callable, scale: float) -> Callable:
    """`loss(lora, batch, key)` from a UNet loss `unet_loss(unet_params, batch, key)`: the base
    params come from `batch["encoders"]["unet"]` and get no gradient."""
    def loss(lora, batch, key):
        base = jax.lax.stop_gradient(batch["encoders"]["unet"])
        return unet_loss(apply_lora(base, lora, scale), batch, key)
    return loss


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def _torch_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flax-layout factors → PyTorch (down/A (r, in[, kh, kw]), up/B (out, r[, 1, 1]))."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.ndim == 4:  # conv: (kh, kw, in, r)
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1)), np.ascontiguousarray(b.T[:, :, None, None])
    return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)


def peft_state(lora: Mapping, unet_params: Mapping, component: str = "unet") -> dict[str, np.ndarray]:
    """diffusers/PEFT names: `unet.<module>.lora_A.weight` / `lora_B.weight`. A target stored as
    a 1×1 conv in the base is exported as a conv LoRA (what diffusers' module is)."""
    names = {"/".join(p): n for n, p in module_index(unet_params).items()}
    flat = W.flatten(unet_params)
    out = {}
    for path, f in jax.device_get(dict(lora)).items():
        down, up = _torch_factors(f["a"], f["b"])
        if down.ndim == 2 and len(flat[tuple(path.split("/"))].shape) == 4:
            down, up = down[:, :, None, None], up[:, :, None, None]
        out[f"{component}.{names[path]}.lora_A.weight"] = down
        out[f"{component}.{names[path]}.lora_B.weight"] = up
    return out


def save_peft(path, lora: Mapping, unet_params: Mapping, *, rank: int, alpha: float,
              targets: Sequence[str]) -> None:
    """`pytorch_lora_weights.safetensors` as diffusers' `save_lora_weights` writes it (the LoRA
    config in the `lora_adapter_metadata`), which `load_lora_weights` and `load_lora` read."""
    meta = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": list(targets),
            "unet.peft_type": "LORA", "unet.init_lora_weights": True, "unet.lora_dropout": 0.0,
            "unet.bias": "none", "unet.use_dora": False, "unet.use_rslora": False,
            "unet.rank_pattern": {}, "unet.alpha_pattern": {}}
    W.save_safetensors(peft_state(lora, unet_params), path,
                       {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)})


def save_kohya(path, lora: Mapping, unet_params: Mapping, *, alpha: float) -> None:
    """The kohya/A1111 layout: `lora_unet_<module with _>.lora_down.weight` / `lora_up.weight` /
    `alpha` (what WebUIs and ComfyUI read)."""
    state = {}
    for key, value in peft_state(lora, unet_params).items():
        module = key[len("unet."):].rsplit(".lora_", 1)[0].replace(".", "_")
        part = "lora_down" if ".lora_A." in key else "lora_up"
        state[f"lora_unet_{module}.{part}.weight"] = value
        state[f"lora_unet_{module}.alpha"] = np.asarray(alpha, np.float32)
    W.save_safetensors(state, path, {"format": "pt", "ss_network_alpha": str(alpha)})


# --------------------------------------------------------------------------------------------
# The training program's LoRA mode (train.text_to_image --lora-rank R)
# --------------------------------------------------------------------------------------------

def add_lora_flags(parser) -> None:
    """--lora-rank, --lora-alpha, --lora-targets, --lora-kohya (train.text_to_image)."""
    g = parser.add_argument_group("LoRA (train adapters only; the base UNet stays frozen)")
    g.add_argument("--lora-rank", type=int, default=None, help="train a rank-R LoRA instead of the whole UNet")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (scale alpha / rank; default: the rank)")
    g.add_argument("--lora-targets", nargs="+", default=None,
                   help=f"module names to adapt (default: {' '.join(DEFAULT_TARGETS)})")
    g.add_argument("--lora-kohya", action="store_true", default=None,
                   help="also write RUN/pytorch_lora_weights.kohya.safetensors (kohya/A1111 layout)")


def lora_scale(rank: int, alpha: float | None) -> float:
    return float(alpha if alpha is not None else rank) / rank


def export_lora(run_dir, lora: Mapping, unet_params: Mapping, *, rank: int, alpha: float | None,
                targets: Sequence[str], kohya: bool = False) -> str:
    """RUN/pytorch_lora_weights.safetensors (PEFT layout; and the kohya copy when asked); returns its path."""
    from pathlib import Path

    alpha = float(alpha if alpha is not None else rank)
    path = Path(run_dir) / "pytorch_lora_weights.safetensors"
    save_peft(path, lora, unet_params, rank=rank, alpha=alpha, targets=targets)
    if kohya:
        save_kohya(Path(run_dir) / "pytorch_lora_weights.kohya.safetensors", lora, unet_params, alpha=alpha)
    return str(path)
