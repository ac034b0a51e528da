"""jaxdiff's Flax UNet2DModel equals diffusers' PyTorch UNet2DModel, loading its saved folders.

Each reference is a diffusers `UNet2DModel` built from a config, with N(0, 0.02) noise added to
every parameter (so no weight is zero and every path matters), `save_pretrained`-ed into a tmp
folder; jaxdiff loads the folder through the real loader. Tolerance: 1e-4 of the output's
largest magnitude (float32 round-off through ~50 layers is ~1e-6 in practice).
"""
from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel as RefUNet

from jaxdiff.errors import JaxdiffError
from helpers import assert_rel_close, nhwc, perturb
from jaxdiff.models.unet_2d import (UNet2DConfig, UNet2DModel, init_params, load_unet_2d, param_shapes,
                                     save_unet_2d)
from jaxdiff.weights import iter_safetensors, save_safetensors

RTOL = 1e-4

COURSE = dict(  # the diffusion course's MNIST UNet (unit 2)
    sample_size=28, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))

DDPM_256 = dict(  # google/ddpm-ema-church-256 / ddpm-celebahq-256 with narrower channels
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(32, 32, 64, 64, 64, 64),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),  # attention at 16×16
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)

FOURIER_SCALE_SHIFT = dict(  # score-SDE-style conditioning on σ, with every "other" option on
    sample_size=16, in_channels=2, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    time_embedding_type="fourier", class_embed_type="timestep", resnet_time_scale_shift="scale_shift",
    center_input_sample=True, mid_block_scale_factor=math.sqrt(2), downsample_type="resnet",
    upsample_type="resnet", norm_num_groups=8, attention_head_dim=8, norm_eps=1e-6)

LEARNED_CLASS_IDS = dict(
    sample_size=8, in_channels=3, out_channels=2, layers_per_block=2, block_out_channels=(8, 16),
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    time_embedding_type="learned", num_train_timesteps=1000, num_class_embeds=10,
    time_embedding_dim=24, mid_block_type=None, act_fn="mish", norm_num_groups=4, dropout=0.1,
    attention_head_dim=4)

IDENTITY_NO_ATTENTION = dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    class_embed_type="identity", add_attention=False, norm_num_groups=4, attn_norm_num_groups=2,
    flip_sin_to_cos=False, act_fn="relu")


def assert_close(got, want, rtol=RTOL):
    assert_rel_close(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol)


def build_reference(folder, seed=0, **config) -> RefUNet:
    torch.manual_seed(seed)
    ref = perturb(RefUNet(**config).eval())
    ref.save_pretrained(folder)
    return ref


def jitted(module: UNet2DModel):
    return jax.jit(lambda params, x, t, y=None: module.apply({"params": params}, x, t, y))


class Case:
    """A reference model saved to a folder, jaxdiff's loaded twin and its jitted forward."""

    def __init__(self, tmp_path_factory, name, **config):
        self.folder = tmp_path_factory.mktemp(name)
        self.config = config
        self.ref = build_reference(self.folder, **config)
        self.module, self.params = load_unet_2d(self.folder)
        self.forward = jitted(self.module)

    def compare(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, params=None):
        with torch.no_grad():
            want = nhwc(self.ref(x, t, class_labels=labels).sample)
        y = None if labels is None else jnp.asarray(labels.numpy())
        got = self.forward(self.params if params is None else params, jnp.asarray(nhwc(x)),
                           jnp.asarray(t.numpy()), y)
        assert_close(got, want)
        return got


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return Case(tmp_path_factory, "course", **COURSE)


# ------------------------------------------------------------------------------- parity

def test_course_config_matches_diffusers(course):
    torch.manual_seed(1)
    course.compare(torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999]))


def test_ddpm_256_config_matches_diffusers(tmp_path_factory):
    """Six levels, one-head attention at 16×16 (level 5 of 6), downsample_padding 0, freq_shift 1."""
    case = Case(tmp_path_factory, "ddpm256", **DDPM_256)
    assert "attentions_0" in case.params["down_blocks_4"]  # 256 / 2**4 = 16: the 16×16 level
    assert case.params["down_blocks_4"]["attentions_0"]["to_q"]["kernel"].shape == (64, 64)
    torch.manual_seed(2)
    case.compare(torch.randn(2, 3, 256, 256), torch.tensor([3, 999]))


def test_fourier_time_class_timestep_scale_shift_center_input_match_diffusers(tmp_path_factory):
    """Fourier σ embedding (output divided by σ), class labels through the time projection,
    scale/shift resnets (so the mid attention has no group norm), centred input, resnet
    up/downsamplers and a mid-block scale factor."""
    case = Case(tmp_path_factory, "fourier", **FOURIER_SCALE_SHIFT)
    assert "group_norm" not in case.params["mid_block"]["attentions_0"]
    torch.manual_seed(3)
    case.compare(torch.rand(3, 2, 16, 16), torch.tensor([0.01, 0.7, 80.0]),
                 labels=torch.tensor([1.0, 2.0, 5.0]))


def test_learned_time_and_class_ids_without_mid_block_match_diffusers(tmp_path_factory):
    case = Case(tmp_path_factory, "learned", **LEARNED_CLASS_IDS)
    assert "mid_block" not in case.params
    torch.manual_seed(4)
    case.compare(torch.randn(3, 3, 8, 8), torch.tensor([0, 17, 999]), labels=torch.tensor([0, 9, 4]))


def test_identity_class_embedding_without_attention_matches_diffusers(tmp_path_factory):
    case = Case(tmp_path_factory, "identity", **IDENTITY_NO_ATTENTION)
    assert "attentions_0" not in case.params["mid_block"]
    torch.manual_seed(5)
    case.compare(torch.randn(2, 1, 8, 8), torch.tensor([5, 600]), labels=torch.randn(2, 32))


def test_fp16_variant_loads_and_matches_the_half_precision_weights(course, tmp_path):
    half = RefUNet.from_pretrained(course.folder).half()
    half.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    module, params = load_unet_2d(tmp_path)
    assert module == course.module
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    reference = half.float().eval()
    torch.manual_seed(6)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([20, 700])
    with torch.no_grad():
        want = nhwc(reference(x, t).sample)
    assert_close(course.forward(params, jnp.asarray(nhwc(x)), jnp.asarray(t.numpy())), want)


def test_bfloat16_compute_keeps_float32_params_and_stays_close(course):
    module = UNet2DModel(UNet2DConfig.from_dict(COURSE), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
    t = jnp.array([50, 900])
    got = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))(course.params, x, t)
    assert got.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits: ~0.4% per op, a few % after ~40 layers.
    assert_close(got, course.forward(course.params, x, t), rtol=5e-2)


def test_scalar_timestep_broadcasts_over_the_batch():
    module = UNet2DModel(UNet2DConfig(**{**IDENTITY_NO_ATTENTION, "class_embed_type": None}))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
                                    param_shapes(module))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    forward = jitted(module)
    # Same program up to the broadcast; XLA may fuse differently, hence not bit-exact.
    np.testing.assert_allclose(forward(params, x, 321), forward(params, x, jnp.array([321, 321])),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- loading and export

def test_export_round_trips_through_diffusers(course, tmp_path):
    """New Flax params → save_unet_2d → diffusers.from_pretrained gives the same outputs."""
    rng = np.random.default_rng(8)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32),
                                    course.params)
    save_unet_2d(tmp_path, course.module, params)
    ref = RefUNet.from_pretrained(tmp_path).eval()
    names = {k for k, _ in iter_safetensors(tmp_path / "diffusion_pytorch_model.safetensors")}
    assert names == set(course.ref.state_dict())
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet2DModel"
    torch.manual_seed(9)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([1, 999])
    with torch.no_grad():
        want = nhwc(ref(x, t).sample)
    assert_close(course.forward(params, jnp.asarray(nhwc(x)), jnp.asarray(t.numpy())), want)


def test_loads_the_unet_subfolder_of_a_pipeline(course, tmp_path):
    shutil.copytree(course.folder, tmp_path / "unet")
    (tmp_path / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    module, params = load_unet_2d(tmp_path)
    assert module == course.module
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, course.params)


def test_loads_pre_0_15_attention_names(course, tmp_path):
    """Old checkpoints (e.g. google/ddpm-*) name the attention query/key/value/proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, value in iter_safetensors(course.folder / "diffusion_pytorch_model.safetensors"):
        for new, legacy in old.items():
            name = name.replace(f".{new}.", f".{legacy}.")
        state[name] = np.array(value)
    assert any(".proj_attn." in k for k in state)
    save_safetensors(state, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(course.folder / "config.json", tmp_path / "config.json")
    _, params = load_unet_2d(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, course.params)


def test_config_of_another_class_is_refused(course, tmp_path):
    config = json.loads((course.folder / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(JaxdiffError, match="UNet2DConditionModel, not a UNet2DModel"):
        load_unet_2d(tmp_path)


# ------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change,message", [
    (dict(down_block_types=("DownBlock2D", "AttnDownBlok2D", "AttnDownBlock2D")),
     "unknown down block type 'AttnDownBlok2D'; choose one of: .*AttnDownBlock2D"),
    (dict(up_block_types=("AttnSkipUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
     "'AttnSkipUpBlock2D' .* not supported"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "unknown mid_block_type"),
    (dict(time_embedding_type="sinusoidal"), "choose one of: fourier, learned, positional"),
    (dict(time_embedding_type="learned"), "needs num_train_timesteps"),
    (dict(downsample_type="pool"), "unknown downsample_type 'pool'; choose one of: conv, resnet"),
    (dict(upsample_type="deconv"), "unknown upsample_type"),
    (dict(resnet_time_scale_shift="spatial"), "choose one of: default, scale_shift"),
    (dict(class_embed_type="projection"), "unknown class_embed_type"),
    (dict(act_fn="swiglu"), "unknown activation function 'swiglu'"),
    (dict(norm_num_groups=24), "divisible by norm_num_groups=24"),
    (dict(attention_head_dim=128), "attention_head_dim=128"),
    (dict(block_out_channels=(32, 64)), "must have the same length"),
    (dict(sample_size=30), "multiples of 4"),
])
def test_bad_config_values_get_one_clear_error(change, message):
    with pytest.raises(JaxdiffError, match=message):
        UNet2DConfig.from_dict({**COURSE, **change})


def test_unknown_config_keys_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="cross_attention_dim"):
        config = UNet2DConfig.from_dict({**COURSE, "cross_attention_dim": 8, "_diffusers_version": "0.1"})
    assert config.block_out_channels == (32, 64, 64)


def test_config_round_trips_through_its_diffusers_dict_and_is_hashable(course):
    config = course.module.config
    saved = json.loads((course.folder / "config.json").read_text())
    assert UNet2DConfig.from_dict(saved) == config
    assert UNet2DConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.to_dict()["_class_name"] == "UNet2DModel"
    for key, value in config.to_dict().items():  # the keys and JSON values diffusers writes
        assert key.startswith("_") or saved[key] == value, key
    assert hash(config) == hash(UNet2DConfig.from_dict(saved))
    assert UNet2DConfig.from_dict({**COURSE, "sample_size": [28, 28]}).image_size == (28, 28)


@pytest.mark.parametrize("shape,message", [
    ((2, 1, 28, 28), "looks NCHW"),
    ((2, 28, 28, 3), "takes in_channels=1"),
    ((28, 28, 1), r"\(batch, height, width, 1\)"),
    ((2, 30, 28, 1), "multiples of 4"),
])
def test_bad_sample_shapes_are_refused_at_trace_time(course, shape, message):
    with pytest.raises(JaxdiffError, match=message):
        jax.eval_shape(course.module.apply, {"params": course.params}, jnp.zeros(shape), 1)


def test_bad_timestep_and_class_label_inputs_are_refused(course):
    apply = lambda *a: jax.eval_shape(course.module.apply, {"params": course.params}, *a)  # noqa: E731
    x = jnp.zeros((2, 28, 28, 1))
    with pytest.raises(JaxdiffError, match=r"timestep must be a scalar or a \(2,\) array"):
        apply(x, jnp.zeros((3,)))
    with pytest.raises(JaxdiffError, match="no class embedding"):
        apply(x, 1, jnp.zeros((2,), jnp.int32))
    conditional = UNet2DModel(UNet2DConfig.from_dict({**COURSE, "num_class_embeds": 10}))
    params = jax.eval_shape(lambda key: init_params(conditional, key), jax.random.PRNGKey(0))
    with pytest.raises(JaxdiffError, match="pass class_labels"):
        jax.eval_shape(conditional.apply, {"params": params}, x, 1)
    with pytest.raises(JaxdiffError, match="integer class ids"):
        jax.eval_shape(conditional.apply, {"params": params}, x, 1, jnp.zeros((2,)))
