"""LoRA adapters (jaxdiff.adapters): PEFT files made by peft through diffusers and kohya files
written here from known matrices load onto the tiny SD fixture; fusing is exact and undoable;
merging with traced scales equals fusing and does not recompile; images equal diffusers'
`load_lora_weights` (+ `fuse_lora` / `set_adapters`) from the same latents.

Tolerance: images in [0, 1] within 5e-4 absolute (float32, as test_stable_diffusion); weights
fused here and by hand within 1e-6 relative (float32 products of the same factors).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal, nhwc

from jaxdiff import adapters as A
from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError

ATOL = 5e-4
SIZE, STEPS = 32, 3
PROMPTS = ["a photo of a red apple", "an astronaut riding a horse"]
NEGATIVE = ["blurry", "low quality"]

# kohya module name → (torch weight shape (out, in[, kh, kw]), rank, alpha)
KOHYA_LAYERS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((32, 32), 4, 2.0),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": ((64, 256), 2, 4.0),
    "lora_unet_down_blocks_0_resnets_0_conv2": ((32, 32, 3, 3), 4, 1.0),       # LoCon, 3×3
    "lora_unet_up_blocks_1_attentions_0_proj_out": ((32, 32, 1, 1), 2, 2.0),  # 1×1 conv
    "lora_te_text_model_encoder_layers_1_self_attn_k_proj": ((32, 32), 2, 2.0),
}


def write_kohya(path, seed=0, magnitude=0.3):
    """A kohya/A1111 LoRA file from known matrices; returns {module: (down, up, alpha)}."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors, known = {}, {}
    for name, (shape, r, alpha) in KOHYA_LAYERS.items():
        down = (magnitude * rng.standard_normal((r, *shape[1:]))).astype(np.float32)
        up = (magnitude * rng.standard_normal((shape[0], r) + ((1, 1) if len(shape) == 4 else ()))).astype(np.float32)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
        known[name] = (down, up, alpha)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return known


def write_peft(folder, seed=1):
    """A diffusers/PEFT LoRA (UNet attention, proj_in, resnet conv1 3×3; text encoder q/v/fc1)
    made with peft on diffusers' pipeline and saved by `save_lora_weights` with its metadata."""
    import torch
    from conftest import SHARED
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    ref = StableDiffusionPipeline.from_pretrained(SHARED / "fixtures" / "tiny-sd-pt-v1", safety_checker=None)
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, alpha_pattern={"conv1": 2},
                      target_modules=["to_q", "to_v", "to_out.0", "conv1", "proj_in"])
    tcfg = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    ref.unet.add_adapter(ucfg)
    inject_adapter_in_model(tcfg, ref.text_encoder)  # transformers 5.24's add_adapter wants peft>=0.22
    with torch.no_grad():  # peft's random B is large next to the tiny weights: tame it
        for name, p in list(ref.unet.named_parameters()) + list(ref.text_encoder.named_parameters()):
            if "lora_B" in name:
                p.mul_(0.1)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def kohya(tmp_path_factory):
    path = tmp_path_factory.mktemp("kohya") / "kohya.safetensors"
    return path, write_kohya(path)


def _flax_kernel_update(down, up, shape):
    """The hand-computed torch-layout update up @ down, as a Flax kernel of `shape`."""
    d = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(
        (up.shape[0],) + down.shape[1:])
    return W.torch_to_flax_array(d, "kernel", shape)


def test_kohya_keys_map_to_flax_kernels_and_fuse_to_the_hand_computed_update(sd, kohya):
    _, params = sd
    path, known = kohya
    adapter = A.load_lora(path, params)
    assert set(adapter) == {"unet", "text_encoder"}
    assert sorted(adapter["unet"]) == sorted([
        "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel",
        "mid_block/attentions_0/transformer_blocks_0/ff/net_2/kernel",
        "down_blocks_0/resnets_0/conv2/kernel", "up_blocks_1/attentions_0/proj_out/kernel"])
    fused, _ = A.fuse(params, adapter, 0.7)
    index = {c: A.module_index(params[c]) for c in ("unet", "text_encoder")}
    for name, (down, up, alpha) in known.items():
        comp, module = ("unet", name[len("lora_unet_"):]) if name.startswith("lora_unet_") \
            else ("text_encoder", name[len("lora_te_"):])
        flax_path = {n.replace(".", "_"): p for n, p in index[comp].items()}[module]
        w = W.flatten(params[comp])[flax_path]
        want = np.asarray(w) + 0.7 * alpha / down.shape[0] * _flax_kernel_update(down, up, w.shape)
        got = W.flatten(fused[comp])[flax_path]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_kohya_names_in_the_original_unet_layout_map_like_diffusers_names(sd, kohya, tmp_path):
    """kohya's SDXL-style module names (`input_blocks_1_0_out_layers_3`, `output_blocks_3_1_proj_out`,
    `middle_block_1_…`) load to the same layers as the diffusers-named file."""
    from safetensors.numpy import save_file

    _, params = sd
    ldm = {"down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": "input_blocks_1_1_transformer_blocks_0_attn2_to_k",
           "mid_block_attentions_0_transformer_blocks_0_ff_net_2": "middle_block_1_transformer_blocks_0_ff_net_2",
           "down_blocks_0_resnets_0_conv2": "input_blocks_1_0_out_layers_3",
           "up_blocks_1_attentions_0_proj_out": "output_blocks_2_1_proj_out"}
    tensors = {}
    for key, value in W.iter_safetensors(kohya[0]):
        for new, old in ldm.items():
            key = key.replace(f"lora_unet_{new}.", f"lora_unet_{old}.")
        tensors[key] = value
    save_file(tensors, str(tmp_path / "ldm.safetensors"))
    a, b = A.load_lora(kohya[0], params), A.load_lora(tmp_path / "ldm.safetensors", params)
    assert_trees_equal(a, b)


def test_unfuse_restores_the_params_bit_for_bit(sd, kohya):
    _, params = sd
    adapter = A.load_lora(kohya[0], params)
    fused, originals = A.fuse(params, adapter, 1.3)
    assert not np.array_equal(fused["unet"]["down_blocks_0"]["resnets_0"]["conv2"]["kernel"],
                              params["unet"]["down_blocks_0"]["resnets_0"]["conv2"]["kernel"])
    twice, originals2 = A.fuse(fused, adapter, -0.4)
    assert_trees_equal(A.unfuse(A.unfuse(twice, originals2), originals), params)


def test_unknown_keys_and_pickles_are_refused(sd, kohya, tmp_path):
    from safetensors.numpy import save_file

    _, params = sd
    bad = {"lora_unet_no_such_block_to_q.lora_down.weight": np.zeros((2, 32), np.float32),
           "lora_unet_no_such_block_to_q.lora_up.weight": np.zeros((32, 2), np.float32),
           "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((2, 32), np.float32),
           "something_else.weight": np.zeros((2,), np.float32)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(JaxdiffError, match=r"4 LoRA keys match no parameter(?=.*no_such_block)(?=.*something_else)(?=.*lora_te2)"):
        A.load_lora(tmp_path / "bad.safetensors", params)
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(JaxdiffError, match="never unpickles.*safetensors"):
        A.load_lora(tmp_path / "x.ckpt", params)
    assert A.parse_lora_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert A.parse_lora_spec("c:/x.safetensors") == ("c:/x.safetensors", 1.0)


def test_merged_equals_fused_and_a_scale_change_does_not_recompile(sd, kohya):
    """`merge` inside jit with traced scales gives the fused weights (float32 products of the
    same factors: 1e-6), and a second pair of scales reuses the compiled program."""
    pipe, params = sd
    a1 = A.load_lora(kohya[0], params)
    a2 = jax.tree.map(lambda x: x, a1)
    a2["unet"] = {k: dict(v, b=-0.5 * v["b"]) for k, v in a1["unet"].items()}
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
    ctx = jnp.asarray(np.random.default_rng(1).standard_normal((1, 7, 32)), jnp.float32)

    @jax.jit
    def run(params, adapters, scales):
        unet = A.merge(params, adapters, scales)["unet"]
        return pipe.unet.apply({"params": unet}, x, jnp.array([500]), ctx), unet

    for scales in ([0.8, 0.3], [-1.0, 2.0]):
        _, merged = run(params, [a1, a2], jnp.asarray(scales))
        fused = A.fuse(A.fuse(params, a1, scales[0])[0], a2, scales[1])[0]["unet"]
        for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(fused)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert run._cache_size() == 1


@pytest.mark.extended
def test_peft_alpha_comes_from_the_metadata(sd, files):
    _, params = sd
    adapter = A.load_lora(files["peft"], params)
    unet = adapter["unet"]
    assert float(unet["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"]["scale"]) == 2.0
    assert float(unet["down_blocks_0/resnets_0/conv1/kernel"]["scale"]) == 0.5   # alpha_pattern
    assert unet["down_blocks_0/resnets_0/conv1/kernel"]["a"].shape == (3, 3, 32, 4)
    assert float(adapter["text_encoder"]["text_model/encoder/layers/0/mlp/fc1/kernel"]["scale"]) == 1.0


# ------------------------------------------------------------------------------------------------
# Images against diffusers (extended)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, kohya):
    return {"peft": write_peft(tmp_path_factory.mktemp("peft")), "kohya": kohya[0],
            "kohya_for_diffusers": _split_kohya_for_diffusers(kohya[0], tmp_path_factory.mktemp("k"))}


def _split_kohya_for_diffusers(path, folder):
    """diffusers 0.42 under transformers 5 cannot load kohya text-encoder keys (its converter
    emits `text_model.`-prefixed names the v5 CLIPTextModel lacks: "Could not automatically
    infer state dict type"). The reference therefore reads the kohya file's UNet part as kohya
    and its text-encoder part re-written in the PEFT layout (alpha/r folded into lora_B)."""
    from safetensors.numpy import save_file

    unet, te = {}, {}
    tensors = dict(W.iter_safetensors(path))
    for key, value in tensors.items():
        if key.startswith("lora_unet_"):
            unet[key] = value
        elif key.endswith(".lora_down.weight"):
            module = key[len("lora_te_"):-len(".lora_down.weight")]
            name = module.replace("text_model_encoder_layers_", "encoder.layers.").replace(
                "_self_attn_", ".self_attn.")
            up = tensors[key.replace("lora_down", "lora_up")]
            alpha = float(tensors[key.replace(".lora_down.weight", ".alpha")])
            te[f"text_encoder.{name}.lora_A.weight"] = value
            te[f"text_encoder.{name}.lora_B.weight"] = up * np.float32(alpha / value.shape[0])
    save_file(unet, str(folder / "unet.safetensors"))
    save_file(te, str(folder / "te.safetensors"))
    return folder / "unet.safetensors", folder / "te.safetensors"


def _reference(files, names):
    from conftest import SHARED
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(SHARED / "fixtures" / "tiny-sd-pt-v1", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    for name in names:
        if name == "kohya":
            unet, te = files["kohya_for_diffusers"]
            ref.load_lora_weights(str(unet), adapter_name=name)
            ref.load_lora_weights(str(te), adapter_name=name)
        else:
            ref.load_lora_weights(str(files[name]), adapter_name=name)
    return ref


def _latents(seed=0):
    import torch

    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _torch_images(ref, latents):
    import torch

    with torch.no_grad():
        return ref(PROMPTS, negative_prompt=NEGATIVE, latents=latents.clone(), num_inference_steps=STEPS,
                   guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np").images


@pytest.mark.extended
@pytest.mark.parametrize("name", ["peft", "kohya"])
def test_one_fused_adapter_matches_diffusers_fuse_lora(sd, files, name):
    from jaxdiff.pipelines import stable_diffusion as sdp

    pipe, params = sd
    ref = _reference(files, [name])
    base = _torch_images(ref, _latents())
    ref.fuse_lora(lora_scale=0.7)
    want = _torch_images(ref, _latents())
    assert np.abs(want - base).max() > 1e-2  # the adapter changes the image
    fused, _ = A.fuse(params, A.load_lora(files[name], params), 0.7)
    ids, neg = sdp.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    config = sdp.GenerateConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    got = sdp.generate(pipe, fused, ids, neg, jax.random.key(0), 7.5, config=config, latents=nhwc(_latents()))
    np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.extended
def test_two_adapters_with_traced_scales_match_diffusers_set_adapters(sd, files):
    from jaxdiff.adapters.pipeline import (
        _generate,
        generate_with_adapters,
        load_pipeline_loras,
    )
    from jaxdiff.pipelines import stable_diffusion as sdp

    pipe, params = sd
    ref = _reference(files, ["peft", "kohya"])
    adapters, _ = load_pipeline_loras(params, [str(files["peft"]), str(files["kohya"])])
    ids, neg = sdp.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    config = sdp.GenerateConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    before = _generate._cache_size()
    for scales in ([0.8, 0.5], [0.3, 1.2]):
        ref.set_adapters(["peft", "kohya"], adapter_weights=scales)
        want = _torch_images(ref, _latents(1))
        got = generate_with_adapters(pipe, params, adapters, np.asarray(scales), ids, neg,
                                     jax.random.key(0), 7.5, config=config, latents=nhwc(_latents(1)))
        np.testing.assert_allclose(got, want, atol=ATOL)
    assert _generate._cache_size() == before + 1  # the second pair of scales reused the program


@pytest.mark.extended
def test_sample_program_fuses_lora_flags(sd, kohya, tmp_path):
    """`sample.stable_diffusion --lora FILE:SCALE` (twice) writes the images of the params with
    both adapters fused at their scales (PNG rounding: within one 8-bit level)."""
    from PIL import Image

    from jaxdiff.pipelines import stable_diffusion as sdp
    from sample.stable_diffusion import main

    pipe, params = sd
    other = tmp_path / "other.safetensors"
    write_kohya(other, seed=5)
    latents = _latents(2)
    np.save(tmp_path / "latents.npy", latents.numpy())
    paths = main(["--model-dir", str(pipe.folder), "--prompt", PROMPTS[0], "--negative-prompt", NEGATIVE[0],
                  "--steps", str(STEPS), "--latents", str(tmp_path / "latents.npy"), "--dtype", "fp32",
                  "--devices", "one", "--no-compile-cache", "--out", str(tmp_path / "out"),
                  "--lora", f"{kohya[0]}:0.6", "--lora", f"{other}:-0.4"])
    fused = A.fuse(A.fuse(params, A.load_lora(kohya[0], params), 0.6)[0], A.load_lora(other, params), -0.4)[0]
    ids, neg = sdp.tokenize_prompts(pipe, [PROMPTS[0]] * 2, NEGATIVE[0])
    config = sdp.GenerateConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    want = sdp.generate(pipe, fused, ids, neg, jax.random.key(0), 7.5, config=config, latents=nhwc(latents))
    got = np.stack([np.asarray(Image.open(p), np.float32) / 255 for p in paths])
    np.testing.assert_allclose(got, np.asarray(want), atol=1 / 255 + 1e-6)


# ------------------------------------------------------------------------------------------------
# Training adapters (jaxdiff.adapters.training)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_lora(sd, cache, tmp_path_factory):
    """Rank-4 LoRA (alpha 8) on the attention projections and a resnet conv, 40 AdamW steps on
    one cached batch; (losses, lora, PEFT file, kohya file)."""
    import optax
    from helpers import cached_batch

    from jaxdiff.adapters import training as T
    from jaxdiff.schedulers import create_scheduler
    from jaxdiff.training.state import create_train_state, make_train_step
    from jaxdiff.training.text_to_image import LossConfig, text_to_image_loss

    pipe, params = sd
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv2")
    lora = T.init_lora(params["unet"], 4, targets, jax.random.key(0))
    sched = create_scheduler(pipe.folder / "scheduler", name="ddpm")
    loss = T.lora_loss(text_to_image_loss(pipe, sched, LossConfig(), axis_name=None), 8 / 4)
    tx = optax.adam(3e-3)
    step = jax.jit(make_train_step(loss, tx, axis_name=None))
    state = create_train_state(lora, tx, jax.random.PRNGKey(0))
    batch = {**cached_batch(cache, np.arange(8)), "encoders": {"unet": params["unet"]}}
    losses = []
    for _ in range(40):
        state = state.replace(step=jnp.zeros((), jnp.int32))  # the same noise every step: a fixed target
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    folder = tmp_path_factory.mktemp("trained")
    T.save_peft(folder / "pytorch_lora_weights.safetensors", state.params, params["unet"], rank=4, alpha=8,
                targets=targets)
    T.save_kohya(folder / "kohya.safetensors", state.params, params["unet"], alpha=8)
    return losses, state.params, folder / "pytorch_lora_weights.safetensors", folder / "kohya.safetensors"


@pytest.mark.extended
def test_lora_training_updates_only_the_adapters_and_the_loss_decreases(sd, trained_lora):
    from jaxdiff.adapters import training as T

    _, params = sd
    losses, lora, peft_file, kohya_file = trained_lora
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert all(p.endswith("kernel") for p in lora) and len(lora) == 4 * 2 * 4 + 8  # 4 blocks × 2 attn, 8 resnets
    merged = T.apply_lora(params["unet"], lora, 2.0)
    for comp_file in (peft_file, kohya_file):  # both exports read back to the trained update
        fused = A.fuse(params, A.load_lora(comp_file, params), 1.0)[0]["unet"]
        for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(merged)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.extended
def test_training_program_trains_a_lora_that_diffusers_loads(sd, model_dir, caption_folder, cache, tmp_path):
    """`train.text_to_image --lora-rank 4 --lora-alpha 8 --lora-kohya`: RUN holds the adapters
    (PEFT and kohya layouts, no UNet export); the adapter lowers the fixed-noise loss of the
    cached examples, and diffusers' `load_lora_weights` of it gives jaxdiff's image."""
    from helpers import cached_batch, run_args

    from jaxdiff.pipelines import stable_diffusion as sdp
    from jaxdiff.schedulers import create_scheduler
    from jaxdiff.training.text_to_image import LossConfig, text_to_image_loss
    from train.text_to_image import main

    pipe, params = sd
    out = tmp_path / "run"
    main(run_args(model_dir, caption_folder, out, "--no-compile-cache", "--steps", "30", "--lr", "3e-3",
                            "--cache-latents", "--cache-dtype", "float32", "--no-samples", "--best-metric", "none",
                            "--lora-rank", "4", "--lora-alpha", "8", "--lora-kohya", "--checkpoint-every", "30"))
    peft_file = out / "pytorch_lora_weights.safetensors"
    assert peft_file.is_file() and (out / "pytorch_lora_weights.kohya.safetensors").is_file()
    assert not (out / "unet").exists()
    trained = {**params, "unet": A.fuse(params, A.load_lora(peft_file, params), 1.0)[0]["unet"]}
    loss = jax.jit(text_to_image_loss(pipe, create_scheduler(pipe.folder / "scheduler", name="ddpm"), LossConfig(),
                                      axis_name=None))
    batch = cached_batch(cache, range(16))
    before = np.mean([float(loss(params["unet"], batch, jax.random.PRNGKey(k))[0]) for k in range(4)])
    after = np.mean([float(loss(trained["unet"], batch, jax.random.PRNGKey(k))[0]) for k in range(4)])
    assert after < 0.9 * before, (before, after)
    ref = _reference({"run": peft_file}, ["run"])
    want = _torch_images(ref, _latents(5))
    ids, neg = sdp.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    config = sdp.GenerateConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    got = sdp.generate(pipe, trained, ids, neg, jax.random.key(0), 7.5, config=config, latents=nhwc(_latents(5)))
    np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.extended
def test_a_lora_run_resumed_equals_an_uninterrupted_run(model_dir, caption_folder, tmp_path):
    """A LoRA run stopped after its step-6 checkpoint and resumed to step 12 ends with the
    adapters, their AdamW state and the exported adapter file of the run never stopped, bit for bit."""
    from helpers import checkpoint_part, run_args

    from jaxdiff.weights import iter_safetensors
    from train.text_to_image import main

    flags = ("--lr", "3e-3", "--cache-latents", "--cache-dtype", "float32", "--no-samples", "--best-metric",
             "none", "--lora-rank", "4", "--lora-alpha", "8", "--checkpoint-every", "6")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    main(run_args(model_dir, caption_folder, whole, "--steps", "12", *flags))
    main(run_args(model_dir, caption_folder, parts, "--steps", "6", *flags))
    main(run_args(model_dir, caption_folder, parts, "--steps", "12", "--resume", *flags))
    for part in ("params", "opt_state"):
        assert_trees_equal(checkpoint_part(parts, 12, part)[0], checkpoint_part(whole, 12, part)[0])
    files = [dict(iter_safetensors(run / "pytorch_lora_weights.safetensors")) for run in (whole, parts)]
    assert sorted(files[0]) == sorted(files[1]) and files[0]
    for name, value in files[0].items():
        np.testing.assert_array_equal(files[1][name], value)
