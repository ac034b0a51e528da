"""DPT depth estimation, its image processor and the resizes depth-to-image relies on, against
the PyTorch references (transformers' DPTForDepthEstimation and DPTImageProcessor, torch's
interpolate, PIL's resize).

Tolerances: the DPT's depth within 1e-4 of transformers' relative to its largest value (float32;
observed ~1e-6: round-off of the BiT, 4 ViT layers and the fusion convolutions). torch's
interpolate within 1e-6 of the data's scale (ATen's own weights and summation order; observed
≤ 3e-7, where its compiler fuses multiply-adds differently). PIL's 8-bit resize and the
processor's rescale/normalise are exact.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from helpers import DPT_SIZE, build_tiny_dpt, nhwc
from PIL import Image

from jaxdiff import resize
from jaxdiff.errors import JaxdiffError
from jaxdiff.models import dpt, dpt_preprocess


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory):
    """(transformers model, jaxdiff model, params) of a tiny DPT-hybrid saved as safetensors."""
    folder = tmp_path_factory.mktemp("dpt") / "depth_estimator"
    torch.manual_seed(0)
    ref = build_tiny_dpt(folder)
    model, params = dpt.load_dpt(folder.parent)  # the pipeline layout: <folder>/depth_estimator
    return ref, model, params


def test_dpt_hybrid_depth_matches_transformers(tiny_dpt):
    ref, model, params = tiny_dpt
    assert model.config.is_hybrid and model.config.use_batch_norm_in_fusion_residual
    x = np.random.default_rng(0).normal(size=(2, 3, DPT_SIZE, DPT_SIZE)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).predicted_depth.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, nhwc(x)))
    assert got.shape == want.shape == (2, DPT_SIZE, DPT_SIZE)
    assert np.abs(want).max() > 0  # a depth that is not all zero after the final ReLU
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_dpt_weights_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    folder = tmp_path / "dpt"
    build_tiny_dpt(folder)
    state = load_file(folder / "model.safetensors")
    del state["head.head.4.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(JaxdiffError, match="head/head_4/kernel"):
        dpt.load_dpt(folder, None)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", [(48, 40, 6, 5), (5, 7, 23, 9), (16, 16, 32, 32)])
def test_interpolate_matches_torch(mode, align_corners, shape):
    """Down, up and ×2 resizes of depth-map-like data (B, H, W) and of NHWC maps."""
    h, w, oh, ow = shape
    x = (np.random.default_rng(h * w).normal(size=(2, 3, h, w)) * 5).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(oh, ow), mode=mode,
                                           align_corners=align_corners).numpy()
    scale = np.abs(x).max()
    got = np.asarray(jax.jit(lambda v: resize.interpolate(v, (oh, ow), mode, align_corners))(x[:, 0]))
    assert np.abs(got - want[:, 0]).max() <= 1e-6 * scale
    got = np.asarray(jax.jit(lambda v: resize.interpolate_matmul(v, (oh, ow), mode, align_corners))(nhwc(x)))
    assert np.abs(got - nhwc(want)).max() <= 2e-6 * scale


@pytest.mark.parametrize("resample", [2, 3])
def test_pil_resize_is_pils_to_the_bit(resample):
    rng = np.random.default_rng(resample)
    for (h, w), (oh, ow) in [((45, 61), (16, 16)), ((20, 30), (64, 48)), ((32, 32), (32, 32))]:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(image).resize((ow, oh), resample=resample))
        fn = jax.jit(lambda v: resize.pil_resize(v, (oh, ow), resize.pil_filter_name(resample)))  # noqa: B023
        got = np.asarray(fn(image[None]))[0]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("settings", [
    {"size": {"height": 24, "width": 24}, "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    {"size": {"height": 20, "width": 28}, "resample": 2, "keep_aspect_ratio": True, "ensure_multiple_of": 8,
         "do_pad": True, "size_divisor": 16},
])
def test_preprocess_matches_the_image_processor(tmp_path, settings):
    from transformers import DPTImageProcessor

    proc = DPTImageProcessor(**settings)
    proc.save_pretrained(tmp_path / "feature_extractor")
    config = dpt_preprocess.load_image_processor_config(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 37, 45, 3), dtype=np.uint8)
    want = proc(images=[Image.fromarray(i) for i in images], return_tensors="np").pixel_values
    got = np.asarray(jax.jit(lambda v: dpt_preprocess.preprocess(config, v))(images / 255.0))
    assert got.shape == nhwc(want).shape
    np.testing.assert_allclose(got, nhwc(want), rtol=0, atol=1e-6)


def test_unsupported_processor_and_model_configs_are_refused(tmp_path):
    with pytest.raises(JaxdiffError, match="resample"):
        dpt_preprocess.DPTImageProcessorConfig.from_dict({"resample": 1})
    with pytest.raises(JaxdiffError, match="preprocessor_config.json"):
        dpt_preprocess.load_image_processor_config(tmp_path)
    with pytest.raises(JaxdiffError, match="layer_type"):
        dpt.DPTConfig.from_dict({"is_hybrid": True, "backbone_config": {"layer_type": "preactivation"}})


@pytest.mark.extended
@pytest.mark.parametrize("readout_type", ["project", "add", "ignore"])
def test_vit_dpt_depth_matches_transformers(tmp_path, readout_type):
    """The plain ViT DPT (patch embeddings, four reassembled ViT layers, no BiT)."""
    from helpers import perturb
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(1)
    ref = perturb(DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, readout_type=readout_type)).eval(), 0.05)
    with torch.no_grad():
        ref.head.head[4].bias.fill_(0.5)  # keep the final ReLU's output above zero
    ref.save_pretrained(tmp_path / "dpt")
    model, params = dpt.load_dpt(tmp_path / "dpt", None)
    assert not model.config.is_hybrid
    x = np.random.default_rng(1).normal(size=(1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).predicted_depth.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, nhwc(x)))
    assert np.abs(want).max() > 0
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
