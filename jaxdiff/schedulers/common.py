"""The arithmetic every scheduler shares: beta schedules, timestep spacing, sigma schedules,
the one conversion of a model output to (x0, eps), clipping and dynamic thresholding.

Beta schedules are computed once on the host in numpy with the float32 operations PyTorch's CPU
kernels perform for diffusers (`torch.linspace` as fused multiply-adds, `torch.sigmoid` with
SLEEF's `expf`, `torch.cumprod` accumulated in float64), so betas and alphas_cumprod equal
diffusers' to the last bit (tests/test_scheduler_betas.py). Conversions are jnp functions of
arrays and broadcast a per-sample coefficient of shape ``(B,)`` over NHWC samples.

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


def _fma_f32(a, b, c) -> np.ndarray:
    """a·b + c of float32 arrays rounded once to float32, as a fused multiply-add does. The
    float64 product is exact; the float64 sum's error (TwoSum) decides the one case where
    rounding it again to float32 would round twice: a float64 sum exactly between two floats."""
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a * b
    r = p + c
    bp = r - c
    err = (p - bp) + (c - (r - bp))
    out = r.astype(np.float32)
    other = np.nextafter(out, np.where(r > out, np.inf, -np.inf).astype(np.float32))
    tie = (out.astype(np.float64) + other.astype(np.float64)) / 2 == r
    nudged = np.where(err > 0, np.maximum(out, other), np.minimum(out, other))
    return np.where(tie & (err != 0), nudged, out).astype(np.float32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit: the
    float32 step (end - start) / (steps - 1), then start + i·step for the first half and
    end - (steps-1-i)·step for the rest, each a fused multiply-add (PyTorch's AVX2/AVX-512
    kernels; numpy's float64 linspace rounded to float32 differs in 1 to 5 ulp)."""
    if steps == 1:
        return np.asarray([start], np.float32)
    s, e = np.float32(start), np.float32(end)
    step = np.float32(np.float32(e - s) / np.float32(steps - 1))
    i = np.arange(steps)
    first = _fma_f32(step, i.astype(np.float32), s)
    second = _fma_f32(-step, (steps - 1 - i).astype(np.float32), e)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def _sleef_expf(x: np.ndarray) -> np.ndarray:
    """float32 exp as SLEEF's `expf_u10` computes it (PyTorch's vectorised `exp` on x86):
    Cody-Waite reduction by ln 2, a degree-6 polynomial in fused multiply-adds, ldexp."""
    x = np.asarray(x, np.float32)
    q = np.rint(x * np.float32(1.4426950408889634)).astype(np.int32)
    qf = q.astype(np.float32)
    s = _fma_f32(qf, np.float32(-0.693145751953125), x)
    s = _fma_f32(qf, np.float32(-1.428606765330187045e-06), s)
    u = np.full(x.shape, np.float32(0.000198527617612853646278381))
    for c in (0.00139304355252534151077271, 0.00833336077630519866943359,
              0.0416664853692054748535156, 0.166666671633720397949219, 0.5):
        u = _fma_f32(u, s, np.float32(c))
    u = np.float32(1) + _fma_f32(s * s, u, s)
    return np.ldexp(u, q).astype(np.float32)


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float,
               trained_betas=None) -> np.ndarray:
    """(T,) float32 betas, bit for bit as diffusers builds them (`trained_betas` wins when given)."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        if betas.ndim != 1 or betas.size == 0:
            raise JaxdiffError(f"trained_betas must be a non-empty list of floats, got shape {betas.shape}")
        return betas
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch_linspace_f32(beta_start, beta_end, T)
    if beta_schedule == "scaled_linear":
        root = torch_linspace_f32(beta_start ** 0.5, beta_end ** 0.5, T)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(T)
    if beta_schedule == "laplace":
        return betas_for_alpha_bar(T, alpha_transform_type="laplace")
    if beta_schedule == "sigmoid":  # torch.sigmoid(linspace(-6, 6)) * (end - start) + start
        x = torch_linspace_f32(-6.0, 6.0, T)
        exp = _sleef_expf(np.float32(0) - x)
        tail = T % 32  # PyTorch's scalar loop after its 2×16-wide vector blocks: libm's expf
        exp[T - tail:] = np.exp(-x[T - tail:].astype(np.float64)).astype(np.float32)
        sig = np.float32(1) / (np.float32(1) + exp)
        return (sig * np.float32(beta_end - beta_start) + np.float32(beta_start)).astype(np.float32)
    raise unknown_choice("beta_schedule", beta_schedule, BETA_SCHEDULES + ("(or trained_betas)",))


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so the last step has SNR 0. Not
    bit-exact: torch's vectorised sqrt is not correctly rounded (a few ulp, see the test)."""
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
    float32 (what torch.cumprod does on the CPU: its float32 accumulator type is double)."""
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


def x0_and_eps(prediction_type: str, x, model_output, alpha_t, sigma_t, *,
               variance_preserving: bool = True):
    """(x0, eps) that a model output implies for the sample x = alpha_t·x0 + sigma_t·eps.

    The one place a network's parameterisation (eps, v or x0) is adapted: every scheduler calls
    this (k-diffusion's model wrappers play the same role). Two forms of the same process:
    - variance preserving (DDPM, DDIM, PNDM, DPM-Solver): alpha_t = sqrt(ᾱ), sigma_t = sqrt(1-ᾱ);
    - variance exploding (Euler, LMS; `variance_preserving=False`): alpha_t = 1, sigma_t = σ,
      and v is the velocity of the VP sample x / r, r = sqrt(alpha_t² + sigma_t²):
      x0 = alpha_t x / r² - (sigma_t / r) v (diffusers' Euler/LMS formula).
    alpha_t, sigma_t: scalars or (B,) per sample. Returns arrays shaped like x.
    """
    a, s = expand_to(alpha_t, x), expand_to(sigma_t, x)
    if prediction_type == "epsilon":
        return (x - s * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (x - a * model_output) / s
    if prediction_type == "v_prediction":
        if variance_preserving:
            return a * x - s * model_output, a * model_output + s * x
        r2 = a * a + s * s
        r = jnp.sqrt(r2)
        return a * x / r2 - s / r * model_output, s * x / r2 + a / r * model_output
    raise unknown_choice("prediction_type", prediction_type, PREDICTION_TYPES)


def to_x0_and_eps(prediction_type: str, x, model_output, alpha_prod):
    """`x0_and_eps` at ᾱ = `alpha_prod` (scalar or (B,)): the VP schedulers' form."""
    alpha_prod = jnp.asarray(alpha_prod)
    return x0_and_eps(prediction_type, x, model_output, jnp.sqrt(alpha_prod), jnp.sqrt(1 - alpha_prod))


def pred_x0_from_eps(x, eps, alpha_prod):
    """x0 = (x - sqrt(1-ᾱ) eps) / sqrt(ᾱ)."""
    return to_x0_and_eps("epsilon", x, eps, alpha_prod)[0]


def pred_eps_from_x0(x, x0, alpha_prod):
    """eps = (x - sqrt(ᾱ) x0) / sqrt(1-ᾱ)."""
    return to_x0_and_eps("sample", x, x0, alpha_prod)[1]


def pred_x0_from_v(x, v, alpha_prod):
    """x0 = sqrt(ᾱ) x - sqrt(1-ᾱ) v."""
    return to_x0_and_eps("v_prediction", x, v, alpha_prod)[0]


def pred_eps_from_v(x, v, alpha_prod):
    """eps = sqrt(ᾱ) v + sqrt(1-ᾱ) x."""
    return to_x0_and_eps("v_prediction", x, v, alpha_prod)[1]


def v_from(x0, eps, alpha_prod):
    """v = sqrt(ᾱ) eps - sqrt(1-ᾱ) x0 (Salimans & Ho 2022)."""
    alpha_prod = expand_to(alpha_prod, x0)
    return jnp.sqrt(alpha_prod) * eps - jnp.sqrt(1 - alpha_prod) * x0


def add_noise_vp(x0, noise, alpha_prod):
    """x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) noise."""
    alpha_prod = expand_to(alpha_prod, x0)
    return jnp.sqrt(alpha_prod) * x0 + jnp.sqrt(1 - alpha_prod) * noise


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
