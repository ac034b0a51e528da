"""Shared test set-up: 8 host devices for pmap tests, a persistent XLA cache, shared fixtures.

Tests compare jaxdiff against the PyTorch reference (diffusers/transformers on CPU torch) with
tiny configs. Compiled functions that several tests use are built once in session fixtures.
"""
from __future__ import annotations

import os
from pathlib import Path

# Must happen before jax is imported anywhere.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxdiff.compile_cache import enable_compilation_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
enable_compilation_cache(ROOT / ".jax_cache", min_compile_seconds=0.2)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the project's shared data) is not present")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    return shared_dir / "fixtures"


@pytest.fixture(scope="session")
def mnist_dir(shared_dir) -> Path:
    return shared_dir / "data" / "mnist"


# ------------------------------------------------------------------------------------------------
# Text-to-image fine-tuning on the tiny SD fixture (test_text_to_image, test_program_text_to_image,
# test_distributed)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    """16 coloured squares with captions (helpers.make_caption_folder)."""
    from helpers import make_caption_folder

    return make_caption_folder(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def model_dir(fixtures_dir):
    return fixtures_dir / "tiny-sd-pt-v1"


@pytest.fixture(scope="module")
def sd(model_dir):
    """The fixture pipeline in float32 (exact comparisons), its data and helpers."""
    import jax.numpy as jnp

    from jaxdiff.pipelines.stable_diffusion import load_pipeline

    pipe, params = load_pipeline(model_dir, dtype=jnp.float32)
    return pipe, params


@pytest.fixture(scope="module")
def cache(sd, caption_folder, tmp_path_factory):
    """(data, LatentCache) of the caption folder, float32."""
    from helpers import RES, tok_fn

    from jaxdiff.data.captions import load_imagefolder
    from jaxdiff.data.latent_cache import LatentCache
    from jaxdiff.training.text_to_image import sd_encoders

    pipe, params = sd
    data = load_imagefolder(caption_folder)
    folder = tmp_path_factory.mktemp("cache") / "c"
    return data, LatentCache.build_or_open(folder, data, pipe, params, resolution=RES, tokenize=tok_fn(pipe),
                                           dtype="float32", batch_size=8, verbose=False,
                                           **sd_encoders(pipe))


@pytest.fixture(scope="module")
def losses(sd, cache):
    """Jitted losses shared by the tests below: cached plain / with caption dropout / v target,
    and on the fly with caption dropout."""
    from helpers import OFFSET_SNR, tok_fn

    from jaxdiff.schedulers import create_scheduler
    from jaxdiff.training.text_to_image import LossConfig, text_to_image_loss

    pipe, _ = sd
    null_context = cache[1].null_context
    folder = Path(pipe.folder) / "scheduler"
    eps = create_scheduler(folder, name="ddpm")
    v = create_scheduler(folder, name="ddpm", prediction_type="v_prediction")
    null_ids = tok_fn(pipe)([""])[0]
    return {
        "plain": jax.jit(text_to_image_loss(pipe, eps, LossConfig(**OFFSET_SNR), axis_name=None)),
        "dropout": jax.jit(text_to_image_loss(pipe, eps, LossConfig(cfg_dropout=0.3, **OFFSET_SNR),
                                              null_context=null_context, axis_name=None)),
        "v": jax.jit(text_to_image_loss(pipe, v, LossConfig(**OFFSET_SNR), axis_name=None)),
        "dropout_on_the_fly": jax.jit(text_to_image_loss(pipe, eps, LossConfig(cfg_dropout=0.3, **OFFSET_SNR),
                                                         null_ids=null_ids, axis_name=None)),
    }


@pytest.fixture(scope="session")
def reference_run(fixtures_dir, tmp_path_factory):
    """(data folder, run folder) of 24 uninterrupted steps on one process with 2 devices, in a
    subprocess, made once per session: the baseline of the SIGTERM test
    (test_program_text_to_image) and of the multi-host test (test_distributed)."""
    import subprocess

    from helpers import REFERENCE_FLAGS, TRAIN, make_caption_folder, run_args
    from subprocesses import subprocess_env

    data = make_caption_folder(tmp_path_factory.mktemp("reference_data"))
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(TRAIN + run_args(fixtures_dir / "tiny-sd-pt-v1", data, out, "--steps", "24",
                                           *REFERENCE_FLAGS),
                          cwd=ROOT, env=subprocess_env(2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, out


