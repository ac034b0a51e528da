"""The arithmetic every scheduler shares: beta schedules, timestep spacing, sigma schedules,
the conversions between eps, x0 and v, clipping and dynamic thresholding.

Schedules are computed once on the host in numpy float32 with the operations diffusers uses
(``torch.linspace``/``cumprod`` in float32), so the arrays agree with diffusers to the last
bit or one ulp. Conversions are jnp functions of arrays and broadcast a per-sample coefficient
of shape ``(B,)`` over NHWC samples.

Notation (diffusers/DDPM): ``alpha_prod`` = ᾱ_t = ``alphas_cumprod[t]``; a noisy sample is
``x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) eps``; ``v = sqrt(ᾱ) eps - sqrt(1-ᾱ) x0``; the VE view of the same
process is ``sigma = sqrt((1-ᾱ)/ᾱ)`` with ``x_t / sqrt(ᾱ) = x0 + sigma eps``.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError, unknown_choice

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------
# Beta schedules (host, numpy float32)
# --------------------------------------------------------------------------------------------

def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> np.ndarray:
    """Betas that discretise ᾱ(t) on [0, 1] (`cosine` is Nichol & Dhariwal's squaredcos_cap_v2)."""
    if alpha_transform_type == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    elif alpha_transform_type == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    else:
        raise unknown_choice("alpha_transform_type", alpha_transform_type, ("cosine", "laplace", "exp"))
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float32)


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float,
               trained_betas=None) -> np.ndarray:
    """(T,) float32 betas as diffusers builds them (`trained_betas` wins when given)."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        if betas.ndim != 1 or betas.size == 0:
            raise JaxdiffError(f"trained_betas must be a non-empty list of floats, got shape {betas.shape}")
        return betas
    T = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64).astype(np.float32)
    if beta_schedule == "scaled_linear":
        root = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64).astype(np.float32)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(T)
    if beta_schedule == "laplace":
        return betas_for_alpha_bar(T, alpha_transform_type="laplace")
    if beta_schedule == "sigmoid":
        x = np.linspace(-6, 6, T, dtype=np.float64).astype(np.float32)
        sig = (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)
        return (sig * np.float32(beta_end - beta_start) + np.float32(beta_start)).astype(np.float32)
    raise unknown_choice("beta_schedule", beta_schedule, BETA_SCHEDULES + ("(or trained_betas)",))


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so the last step has SNR 0."""
    betas = np.asarray(betas, np.float32)
    alphas_cumprod = alphas_cumprod_of(betas)
    root = np.sqrt(alphas_cumprod)
    root_0, root_T = root[0].copy(), root[-1].copy()
    root = root - root_T
    root = root * (root_0 / (root_0 - root_T))
    alphas_bar = root ** 2
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def alphas_cumprod_of(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = prod_{s<=t} (1 - beta_s): float32 factors accumulated in float64, then rounded to
    float32 (exactly what torch.cumprod does on CPU)."""
    alphas = np.float32(1) - np.asarray(betas, np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Timestep spacing (host)
# --------------------------------------------------------------------------------------------

def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                     steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps for DDPM/DDIM-style schedulers (Lin et al. 2023, Table 2):
    `leading` = multiples of T//n plus `steps_offset`, `trailing` = counted down from T-1,
    `linspace` = rounded linspace(0, T-1, n)."""
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = T / n
        return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    raise unknown_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)


def float_spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                           steps_offset: int = 0) -> np.ndarray:
    """Descending float32 timesteps for the sigma (k-diffusion style) schedulers: as
    `spaced_timesteps` but `linspace` is not rounded."""
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(steps_offset)
    if spacing == "trailing":
        ratio = T / n
        return (np.arange(T, 0, -ratio)).round().copy().astype(np.float32) - np.float32(1)
    raise unknown_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)


# --------------------------------------------------------------------------------------------
# Sigma schedules (host)
# --------------------------------------------------------------------------------------------

def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1-ᾱ_t)/ᾱ_t), (T,) ascending in t, float32 (computed as diffusers does)."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return np.sqrt((np.float32(1) - ac) / ac).astype(np.float32)


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of `sigma` by linear interpolation in log-sigma."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max down to sigma_min (float64)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas evenly spaced in log-sigma from sigma_max to sigma_min (float64)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


# --------------------------------------------------------------------------------------------
# Array helpers and model-output conversions (jnp; coefficients scalar or (B,))
# --------------------------------------------------------------------------------------------

def expand_to(coef, x):
    """Reshape a scalar or (B,) coefficient to broadcast against x of shape (B, ...)."""
    coef = jnp.asarray(coef)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def pred_x0_from_eps(x, eps, alpha_prod):
    """x0 = (x - sqrt(1-ᾱ) eps) / sqrt(ᾱ)."""
    alpha_prod = expand_to(alpha_prod, x)
    return (x - jnp.sqrt(1 - alpha_prod) * eps) / jnp.sqrt(alpha_prod)


def pred_eps_from_x0(x, x0, alpha_prod):
    """eps = (x - sqrt(ᾱ) x0) / sqrt(1-ᾱ)."""
    alpha_prod = expand_to(alpha_prod, x)
    return (x - jnp.sqrt(alpha_prod) * x0) / jnp.sqrt(1 - alpha_prod)


def pred_x0_from_v(x, v, alpha_prod):
    """x0 = sqrt(ᾱ) x - sqrt(1-ᾱ) v."""
    alpha_prod = expand_to(alpha_prod, x)
    return jnp.sqrt(alpha_prod) * x - jnp.sqrt(1 - alpha_prod) * v


def pred_eps_from_v(x, v, alpha_prod):
    """eps = sqrt(ᾱ) v + sqrt(1-ᾱ) x."""
    alpha_prod = expand_to(alpha_prod, x)
    return jnp.sqrt(alpha_prod) * v + jnp.sqrt(1 - alpha_prod) * x


def v_from(x0, eps, alpha_prod):
    """v = sqrt(ᾱ) eps - sqrt(1-ᾱ) x0 (Salimans & Ho 2022)."""
    alpha_prod = expand_to(alpha_prod, x0)
    return jnp.sqrt(alpha_prod) * eps - jnp.sqrt(1 - alpha_prod) * x0


def add_noise_vp(x0, noise, alpha_prod):
    """x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) noise."""
    alpha_prod = expand_to(alpha_prod, x0)
    return jnp.sqrt(alpha_prod) * x0 + jnp.sqrt(1 - alpha_prod) * noise


def to_x0_and_eps(prediction_type: str, x, model_output, alpha_prod):
    """(pred_x0, pred_eps) from a model output of the given type, in diffusers' (DDIM) formulas."""
    a = expand_to(alpha_prod, x)
    sqrt_a, sqrt_b = jnp.sqrt(a), jnp.sqrt(1 - a)
    if prediction_type == "epsilon":
        return (x - sqrt_b * model_output) / sqrt_a, model_output
    if prediction_type == "sample":
        return model_output, (x - sqrt_a * model_output) / sqrt_b
    if prediction_type == "v_prediction":
        return sqrt_a * x - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * x
    raise unknown_choice("prediction_type", prediction_type, PREDICTION_TYPES)


def from_x0_and_eps(prediction_type: str, x0, eps, alpha_prod):
    """The model output of the given type that corresponds to (x0, eps) at ᾱ: the training target."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return v_from(x0, eps, alpha_prod)
    raise unknown_choice("prediction_type", prediction_type, PREDICTION_TYPES)


def dynamic_threshold(x0, ratio: float = 0.995, max_value: float = 1.0):
    """Imagen's dynamic thresholding (Saharia et al. 2022): per sample, s = the `ratio` quantile
    of |x0| clamped to [1, max_value]; x0 → clip(x0, -s, s) / s. x0: (B, ...)."""
    dtype = x0.dtype
    flat = x0.astype(jnp.promote_types(dtype, jnp.float32)).reshape(x0.shape[0], -1)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape).astype(dtype)
