"""SDXL fine-tuning with train.text_to_image on a tiny SDXL base folder built with diffusers:
both text encoders (penultimate states + pooled projection, through the latent cache) and the
time ids reach the UNet as the SDXL pipeline gives them, the loss decreases, --resume continues
bit for bit from a checkpoint, and the exported RUN/unet loads in diffusers' PyTorch UNet2DConditionModel with the
same output (≤ 1e-4 relative, float32). A refiner folder is one error line."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import assert_trees_equal, cached_batch, checkpoint_part, perturb, rel_err, run_args

RTOL = 1e-4
# SDXL's base layout at toy size (as tests/test_sdxl.py): 64 = 32 + 32 context, 6 time ids × 8 + 32 pooled.
BASE_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 32, 64), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 2, 4), "transformer_layers_per_block": (1, 1, 2), "use_linear_projection": True,
    "cross_attention_dim": 64, "norm_num_groups": 8, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32}
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1, "timestep_spacing": "leading"}
COMMON = ["--no-compile-cache", "--lr", "3e-3", "--ema-decay", "0.9", "--checkpoint-every", "10",
          "--cache-latents", "--cache-dtype", "float32", "--best-metric", "none", "--mixed-precision", "no",
          "--keep-checkpoints", "5"]


def text_encoder_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{"bos_token_id": 521, "eos_token_id": 522, "pad_token_id": 1,
                             "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                             "num_hidden_layers": 3, "vocab_size": 523, "hidden_act": "gelu",
                             "projection_dim": 32, **kw})


@pytest.fixture(scope="module")
def sdxl_dir(fixtures_dir, tmp_path_factory):
    """A tiny SDXL base folder (StableDiffusionXLPipeline.save_pretrained; the SD fixture's VAE
    and tokenizer, tokenizer_2 padding with "!")."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    fixture = fixtures_dir / "tiny-sd-pt-v1"
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(fixture / "vae").eval(),
        text_encoder=perturb(CLIPTextModel(text_encoder_config()).eval()),
        text_encoder_2=perturb(CLIPTextModelWithProjection(text_encoder_config(eos_token_id=2)).eval()),
        tokenizer=CLIPTokenizer.from_pretrained(fixture / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(fixture / "tokenizer", pad_token="!"),
        unet=perturb(UNet2DConditionModel(**BASE_UNET).eval()), scheduler=EulerDiscreteScheduler(**SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    folder = tmp_path_factory.mktemp("sdxl-base")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full_run(sdxl_dir, caption_folder, tmp_path_factory):
    """20 uninterrupted steps (EMA, cached latents and embeddings, a sample grid at the end)."""
    from train.text_to_image import main

    out = tmp_path_factory.mktemp("sdxl-run") / "run"
    main(run_args(sdxl_dir, caption_folder, out, "--steps", "20", *COMMON,
                  "--sample-steps", "2", "--samples-per-prompt", "1", "--validation-prompt", "a red square"))
    return out


def mean_loss(pipe, model_dir, batch, unet_params) -> float:
    from jaxdiff.training.text_to_image import text_to_image_loss, training_scheduler

    loss_fn = jax.jit(text_to_image_loss(pipe, training_scheduler(model_dir), axis_name=None))
    return float(np.mean([loss_fn(unet_params, batch, jax.random.PRNGKey(k))[0] for k in range(4)]))


@pytest.mark.extended
def test_sdxl_fine_tune_uses_both_encoders_and_lowers_the_loss(full_run, sdxl_dir, caption_folder):
    import jax.numpy as jnp

    from jaxdiff.data.captions import load_imagefolder
    from jaxdiff.data.latent_cache import LatentCache
    from jaxdiff.models.unet_2d_condition import load_unet_2d_condition
    from jaxdiff.pipelines import sdxl
    from jaxdiff.training.run_log import read_jsonl
    from jaxdiff.training.text_to_image import caption_tokenizer, encode_text, load_training_pipeline

    pipe, params = load_training_pipeline(sdxl_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    data = load_imagefolder(caption_folder)
    cache = LatentCache(full_run / "cache")
    # the cached caption embedding = the SDXL pipeline's own (both encoders, pooled projection)
    caption = data.caption_strings[data.caption_ids[0][0]]
    ids = sdxl.tokenize_prompts(pipe, [caption])
    want = sdxl.conditioning(pipe, params["text_encoder"], ids.ids, ids.ids_2, np.zeros((1, 6)))
    packed = cache.fetch(np.array([0]), np.array([data.caption_ids[0][0]]))["context"]
    assert packed.shape == (1, 78, 64)
    assert rel_err(packed[:, :77], want["context"]) < 1e-5
    assert rel_err(packed[:, 77, :32], want["text_embeds"]) < 1e-5
    assert np.all(packed[:, 77, 32:] == 0)
    np.testing.assert_allclose(encode_text(pipe, params["text_encoder"], caption_tokenizer(pipe)([caption])),
                               packed, rtol=1e-5, atol=1e-6)
    # the loss on the whole data set drops
    batch = cached_batch((data, cache), range(16))
    _, trained = load_unet_2d_condition(full_run / "unet")
    before, after = mean_loss(pipe, sdxl_dir, batch, params["unet"]), mean_loss(pipe, sdxl_dir, batch, trained)
    assert np.isfinite(after) and after < 0.8 * before, (before, after)
    records = read_jsonl(full_run / "logs" / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any(r.get("image") == "samples" for r in records)
    index = json.loads((full_run / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and (full_run / "text_encoder_2").is_dir()


@pytest.mark.extended
def test_sdxl_resume_continues_bit_for_bit(full_run, tmp_path, capsys):
    """The run stopped after its step-10 checkpoint (a copy without checkpoint 20), resumed, ends
    where the uninterrupted run did: params, EMA (and the data position with them)."""
    import shutil

    from train.text_to_image import main

    out = tmp_path / "split"
    shutil.copytree(full_run, out, ignore=shutil.ignore_patterns("unet"))
    shutil.rmtree(out / "checkpoints" / "20")
    main(["--out", str(out), "--resume", "--no-compile-cache", "--no-progress", "--no-samples"])
    assert "resumed from step 10" in capsys.readouterr().err
    assert (out / "unet").is_dir()
    for part in ("params", "ema_params"):
        assert_trees_equal(checkpoint_part(out, 20, part)[0], checkpoint_part(full_run, 20, part)[0])


@pytest.mark.extended
def test_sdxl_export_loads_in_diffusers_with_the_same_output(full_run):
    import torch
    from diffusers import UNet2DConditionModel

    from jaxdiff.models.unet_2d_condition import load_unet_2d_condition

    module, exported = load_unet_2d_condition(full_run / "unet")
    ema, _ = checkpoint_part(full_run, 20, "ema_params")
    assert_trees_equal(exported, ema)  # the export holds the EMA weights
    ref = UNet2DConditionModel.from_pretrained(full_run / "unet").eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, 77, 64)).astype(np.float32)
    added = {"text_embeds": rng.normal(size=(2, 32)).astype(np.float32),
             "time_ids": np.array([[16, 16, 0, 0, 16, 16], [24, 20, 2, 0, 16, 16]], np.float32)}
    t = np.array([3, 700])
    ours = np.asarray(module.apply({"params": exported}, x, t, ctx, added_cond_kwargs=added))
    with torch.no_grad():
        theirs = ref(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(t), torch.tensor(ctx),
                     added_cond_kwargs={k: torch.tensor(v) for k, v in added.items()}).sample
    assert rel_err(ours, theirs.permute(0, 2, 3, 1).numpy()) < RTOL


def test_sdxl_refiner_is_one_clear_error(caption_folder, tmp_path, capsys):
    from train.text_to_image import main

    refiner = tmp_path / "refiner"
    for component in ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"):
        (refiner / component).mkdir(parents=True)
    (refiner / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
        "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(SystemExit) as e:
        main(run_args(refiner, caption_folder, tmp_path / "run", "--steps", "2", "--no-compile-cache"))
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "SDXL refiner" in err[-1] and "base folder" in err[-1], err
    assert "Traceback" not in "\n".join(err)
