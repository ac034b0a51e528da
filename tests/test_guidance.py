"""Loss guidance against the course's PyTorch loop, and that guidance does what it is for.

Reference: the course's colour-guided sampling loops (unit 2, "Guidance", both variants), written
out below in PyTorch with diffusers' `UNet2DModel` and `DDIMScheduler` (clip_sample, as the
course's), given the same weights (the folder `save_pretrained` writes, loaded by jaxdiff) and the
same x_T.

Tolerances. In float64 both loops agree to ≤1e-4 relative after 10 steps at the course's strength
(scale 40; measured ≤2e-5, the rest being the float32 ᾱ table both schedulers keep). In float32 a
10-step DDIM loop of a random (untrained) UNet amplifies rounding ~100×: PyTorch float32 itself is
~1e-4 away from PyTorch float64, and the colour loss's |·| and clip_sample's kinks make strong
guidance chaotic. So the float32 test checks that jaxdiff is as close to the float64 reference as
PyTorch float32 is, at a strength where the trajectory is smooth.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import assert_trees_equal, nchw, nhwc, rel_err

from jaxdiff import guidance as G
from jaxdiff.errors import JaxdiffError
from jaxdiff.models.unet_2d import load_unet_2d
from jaxdiff.sampling import as_apply_fn, as_denoiser
from jaxdiff.schedulers import create_scheduler

STEPS = 10
TARGET = (0.1, 0.9, 0.5)  # the course's colour
SCALE = 40.0              # the course's guidance_loss_scale
RTOL = 1e-4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny diffusers UNet2DModel + DDIMScheduler saved to disk, and both loaded by jaxdiff."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    folder = tmp_path_factory.mktemp("ddim-pipe")
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    module, params = load_unet_2d(folder)
    sched = create_scheduler(folder / "scheduler")
    state = sched.set_timesteps(sched.create_state(), STEPS)
    return dict(torch_unet=unet, torch_scheduler=scheduler, module=module, params=params,
                sched=sched, state=state, folder=folder)


@pytest.fixture(scope="module")
def x_T():
    return np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)


def guided_loop(module, sched, state):
    """A jitted guided loop; colour, scale and schedule are traced arguments. `.traces` records
    every trace (= compilation)."""
    traces = []

    def run(params, x, key, target, scale, schedule, variant):
        traces.append(variant)
        return G.guided_sample(as_denoiser(module, params), sched, state, x, key, loss=G.make_color_loss(target),
                               guidance_scale=scale, schedule=schedule, variant=variant)

    fn = jax.jit(run, static_argnames="variant")
    fn.traces = traces
    return fn


@pytest.fixture(scope="module")
def run_guided(pipe):
    return guided_loop(pipe["module"], pipe["sched"], pipe["state"])


def course_loop(pipe, x_T, *, variant, scale, weights=None, dtype=torch.float32):
    """The course's colour-guided DDIM loop in PyTorch (both variants), with an optional
    per-timestep weight of the guidance (weights[t])."""
    from jaxdiff.testing.reference import course_color_guided_loop

    unet, scheduler = pipe["torch_unet"].to(dtype), pipe["torch_scheduler"]
    scheduler.set_timesteps(STEPS)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(dtype)
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(dtype)

    x = nchw(x_T).to(dtype)
    x = course_color_guided_loop(unet, scheduler, x, STEPS, variant=variant, scale=scale, target_color=TARGET,
                                 weights=weights)
    pipe["torch_unet"].to(torch.float32)
    return nhwc(x)


@pytest.mark.parametrize("variant", ["shortcut", "through_model"])
def test_colour_guided_loop_matches_the_course_pytorch_loop_float64(pipe, x_T, variant):
    x_T = x_T.astype(np.float64)
    with jax.enable_x64(True):
        module, params = load_unet_2d(pipe["folder"], dtype=jnp.float64, param_dtype=jnp.float64)
        run = guided_loop(module, pipe["sched"], pipe["state"])
        ac = pipe["state"].alphas_cumprod
        for name in ("constant", "sqrt_alpha_bar"):
            schedule = G.guidance_schedule(name, ac)
            got = run(params, x_T, jax.random.key(0), jnp.asarray(TARGET), SCALE, schedule, variant)
            want = course_loop(pipe, x_T, variant=variant, scale=SCALE, weights=np.asarray(schedule),
                               dtype=torch.float64)
            assert got.dtype == jnp.float64
            assert rel_err(got, want) <= RTOL, name
    unguided = course_loop(pipe, x_T, variant=variant, scale=0.0, dtype=torch.float64)
    assert rel_err(want, unguided) > 0.5  # the guidance changed the samples a lot


@pytest.mark.parametrize("variant", ["shortcut", "through_model"])
def test_colour_guided_loop_float32_is_as_exact_as_pytorch_float32(pipe, x_T, run_guided, variant):
    scale = 0.4  # smooth trajectories (see the module docstring); still a 5% change of the samples
    schedule = G.guidance_schedule("sqrt_alpha_bar", pipe["state"].alphas_cumprod)
    got = run_guided(pipe["params"], x_T, jax.random.key(0), jnp.asarray(TARGET), scale, schedule, variant)
    kw = dict(variant=variant, scale=scale, weights=np.asarray(schedule))
    exact = course_loop(pipe, x_T.astype(np.float64), dtype=torch.float64, **kw)
    torch32 = course_loop(pipe, x_T, **kw)
    unguided = course_loop(pipe, x_T, variant=variant, scale=0.0)
    assert rel_err(got, exact) <= max(2 * rel_err(torch32, exact), RTOL)
    assert rel_err(got, torch32) <= 5 * RTOL
    assert rel_err(torch32, unguided) > 100 * RTOL


def test_colour_guidance_lowers_the_colour_loss(pipe, x_T, run_guided):
    target = jnp.asarray(TARGET)
    ones = G.guidance_schedule("constant", pipe["state"].alphas_cumprod)
    key = jax.random.key(0)
    plain = run_guided(pipe["params"], x_T, key, target, 0.0, ones, "shortcut")
    guided = run_guided(pipe["params"], x_T, key, target, SCALE, ones, "shortcut")
    through = run_guided(pipe["params"], x_T, key, target, SCALE, ones, "through_model")
    plain_loss = G.color_loss(plain, target)
    assert (G.color_loss(guided, target) < 0.8 * plain_loss).all()
    assert (G.color_loss(through, target) < 0.8 * plain_loss).all()


def test_changing_scale_schedule_or_colour_does_not_recompile(pipe, x_T, run_guided):
    ac = pipe["state"].alphas_cumprod
    key = jax.random.key(1)
    before = len(run_guided.traces)
    for scale, name, colour in [(1.0, "constant", TARGET), (5.0, "alpha_bar", (1.0, 0.0, 0.0)),
                                (20.0, "sqrt_one_minus_alpha_bar", G.parse_color("#336699"))]:
        run_guided(pipe["params"], x_T, key, jnp.asarray(colour, jnp.float32), scale,
                   G.guidance_schedule(name, ac), "shortcut")
    traced = run_guided.traces[before:]
    assert traced.count("shortcut") <= 1  # at most the first call of this test traces
    size = run_guided._cache_size()
    run_guided(pipe["params"], x_T, key, jnp.asarray(TARGET), 2.5,
               G.guidance_schedule("sqrt_alpha_bar", ac), "shortcut")
    assert run_guided._cache_size() == size


def test_guided_sampling_works_on_a_class_conditioned_model(pipe, x_T):
    """Loss guidance is model-agnostic: the cond (class labels here) goes to the denoiser."""
    from jaxdiff.models.class_conditioned import ClassConditionedUnet, ClassConditionedUnetConfig
    from jaxdiff.models.unet_2d import UNet2DConfig

    unet = UNet2DConfig(sample_size=16, in_channels=1 + 4, out_channels=1, block_out_channels=(8, 16),
                        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    model = ClassConditionedUnet(ClassConditionedUnetConfig(unet, num_classes=10, class_emb_size=4))
    x = jnp.asarray(x_T[..., :1])
    labels = jnp.array([3, 7])
    params = random_params(jax.eval_shape(model.init, jax.random.key(0), x, jnp.int32(0), labels)["params"])
    sched, state = pipe["sched"], pipe["state"]
    denoise = as_denoiser(model, params)
    bright = G.make_color_loss(0.9)  # a grey level: steer the digits towards bright strokes

    @jax.jit
    def run(scale):
        return G.guided_sample(denoise, sched, state, x, jax.random.key(0), labels, loss=bright,
                               guidance_scale=scale, variant="through_model")

    grey = jnp.array([0.9])
    assert (G.color_loss(run(30.0), grey) < 0.8 * G.color_loss(run(0.0), grey)).all()


def random_params(shapes, std=0.2):
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(rng.normal(0, std, s.shape), s.dtype) for s in leaves])


# --------------------------------------------------------------------------------------------
# CLIP loss pieces
# --------------------------------------------------------------------------------------------

def test_spherical_distance_is_the_course_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    input_normed = torch.nn.functional.normalize(ta.unsqueeze(1), dim=2)
    embed_normed = torch.nn.functional.normalize(tb.unsqueeze(0), dim=2)
    want = input_normed.sub(embed_normed).norm(dim=2).div(2).arcsin().pow(2).mul(2)
    got = G.spherical_distance(jnp.asarray(a)[:, None], jnp.asarray(b)[None])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_cutouts_without_augmentation_are_the_image_resized():
    import torch.nn.functional as F

    images = np.random.default_rng(0).random((2, 24, 24, 3)).astype(np.float32)
    cuts = G.make_cutouts(jax.random.key(0), jnp.asarray(images), 3, 16, G.Augmentation.none())
    assert cuts.shape == (3, 2, 16, 16, 3)
    want = nhwc(F.interpolate(nchw(images), size=(16, 16), mode="bilinear", align_corners=False))
    for cut in cuts:
        np.testing.assert_allclose(cut, want, atol=1e-5)


def test_cutouts_are_random_per_cut_and_image_and_differentiable():
    images = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32))
    cuts = G.make_cutouts(jax.random.key(0), images, 4, 16)
    flat = np.asarray(cuts).reshape(8, -1)
    assert len({tuple(np.round(r[:20], 5)) for r in flat}) == 8
    grad = jax.jit(jax.grad(lambda im: G.make_cutouts(jax.random.key(0), im, 4, 16).sum()))(images)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).sum()) > 0


def test_parse_color_and_prompts():
    np.testing.assert_allclose(G.parse_color("#19e680"), [25 / 255, 230 / 255, 128 / 255])
    np.testing.assert_allclose(G.parse_color("0.1, 0.9, 0.5"), TARGET)
    np.testing.assert_allclose(G.parse_color("fff"), [1, 1, 1])
    for bad in ("#12345", "red", "0.1,2,0.5", "0.1,0.2"):
        with pytest.raises(JaxdiffError, match="colour"):
            G.parse_color(bad)
    texts, weights = G.parse_prompts(["Red Rose (still life), red flower painting:3", "blurry:-1"])
    assert texts == ["Red Rose (still life), red flower painting", "blurry"]
    np.testing.assert_allclose(weights, [1.0, -1 / 3])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from jaxdiff.models.clip import load_clip

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, eos_token_id=98,
                         bos_token_id=97, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=16, patch_size=4),
        projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    module, params = load_clip(folder)
    return module, params, folder


def test_clip_loss_matches_the_course_loss_without_augmentation(tiny_clip):
    """With no augmentation, our loss is the course's `clip_loss` of the image mapped to [0, 1]."""
    from transformers import CLIPModel

    module, params, folder = tiny_clip
    ids = jnp.array([[97, 5, 6, 98, 0, 0, 0, 0]])
    text = G.encode_prompts(module, params, ids)
    x0 = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    features = lambda im: module.apply({"params": params}, im, method=module.get_image_features)  # noqa: E731
    loss = G.make_clip_loss(features, text, n_cuts=2, size=16, augmentation=G.Augmentation.none())
    got = loss(jnp.asarray(x0), jax.random.key(0))

    # transformers' PyTorch CLIP with the same weights, the course's clip_loss
    torch_clip = CLIPModel.from_pretrained(folder).eval()
    mean = torch.tensor(G.CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(G.CLIP_STD)[None, :, None, None]
    image = (nchw(x0) + 1) / 2
    with torch.no_grad():
        image_features = torch_clip.get_image_features((image - mean) / std).pooler_output
        text_features = torch_clip.get_text_features(torch.tensor(np.array(ids)).long()).pooler_output
    input_normed = torch.nn.functional.normalize(image_features.unsqueeze(1), dim=2)
    embed_normed = torch.nn.functional.normalize(text_features.unsqueeze(0), dim=2)
    dists = input_normed.sub(embed_normed).norm(dim=2).div(2).arcsin().pow(2).mul(2)
    np.testing.assert_allclose(np.asarray(got), dists[:, 0].numpy(), rtol=1e-4)


def test_clip_guidance_lowers_the_clip_loss(pipe, tiny_clip, x_T):
    module, params, _ = tiny_clip
    text = G.encode_prompts(module, params, jnp.array([[97, 11, 12, 13, 98, 0, 0, 0]]))
    features = lambda im: module.apply({"params": params}, im, method=module.get_image_features)  # noqa: E731
    loss = G.make_clip_loss(features, text, n_cuts=4, size=16)
    sched, state = pipe["sched"], pipe["state"]
    unet, unet_params = pipe["module"], pipe["params"]
    schedule = G.guidance_schedule("sqrt_alpha_bar", state.alphas_cumprod)

    @jax.jit
    def run(scale):
        return G.guided_sample(as_denoiser(unet, unet_params), sched, state, jnp.asarray(x_T), jax.random.key(0), loss=loss,
                               guidance_scale=scale, schedule=schedule)

    plain = G.make_clip_loss(features, text, n_cuts=1, size=16, augmentation=G.Augmentation.none())
    before = plain(run(0.0), jax.random.key(1))
    after = plain(run(300.0), jax.random.key(1))
    assert (after < before).all()


def test_clip_loss_refuses_grey_images_and_a_missing_key():
    loss = G.make_clip_loss(lambda im: im.mean(axis=(1, 2)), jnp.ones((1, 3)), size=16)
    with pytest.raises(JaxdiffError, match="RGB"):
        loss(jnp.zeros((1, 16, 16, 1)), jax.random.key(0))
    with pytest.raises(JaxdiffError, match="PRNG key"):
        loss(jnp.zeros((1, 16, 16, 3)), None)


# --------------------------------------------------------------------------------------------
# A network as a denoiser, and the denoiser loader
# --------------------------------------------------------------------------------------------

def test_as_denoiser_is_the_network_with_its_params_bound(pipe, x_T):
    module, params = pipe["module"], pipe["params"]
    x, t = jnp.asarray(x_T), jnp.int32(500)
    want = module.apply({"params": params}, x, t)
    np.testing.assert_array_equal(as_denoiser(module, params)(x, t, None), want)
    np.testing.assert_array_equal(as_apply_fn(module)(params, x, t), want)
    halved = jax.tree.map(lambda p: p / 2, params)
    np.testing.assert_array_equal(jax.jit(as_apply_fn(module))(halved, x, t),
                                  jax.jit(lambda p: module.apply({"params": p}, x, t))(halved))


@pytest.fixture(scope="module")
def class_unet(tmp_path_factory):
    """A tiny class-conditioned diffusers UNet2DModel (4 classes), saved alone: no scheduler."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=4).eval()
    folder = tmp_path_factory.mktemp("class-unet")
    unet.save_pretrained(folder)
    return unet, folder


def test_load_denoiser_reads_a_diffusers_pipeline_folder(pipe):
    from jaxdiff.pipelines.unet_2d import load_denoiser

    model = load_denoiser(pipe["folder"], "ddim")
    assert model.sample_shape == (16, 16, 3) and model.num_classes is None
    assert_trees_equal(model.params, pipe["params"])
    assert model.scheduler == pipe["sched"]  # the pipeline's scheduler/ config
    assert model.labels(2) is None
    with pytest.raises(JaxdiffError, match="is not class-conditioned; drop --class-label"):
        model.labels(2, 3)
    from_unet = load_denoiser(pipe["folder"] / "unet", "ddpm")  # finds ../scheduler
    np.testing.assert_array_equal(from_unet.scheduler.create_state().betas, pipe["state"].betas)
    assert type(from_unet.scheduler).__name__ == "DDPMScheduler"


def test_load_denoiser_class_conditioned_unet_labels_and_output(class_unet):
    from jaxdiff.pipelines.unet_2d import load_denoiser

    unet, folder = class_unet
    model = load_denoiser(folder, "ddim")
    assert model.sample_shape == (8, 8, 1) and model.num_classes == 4
    assert model.scheduler == create_scheduler({"_class_name": "DDPMScheduler"}, name="ddim")  # no config: defaults
    np.testing.assert_array_equal(model.labels(6), [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(model.labels(3, 2), [2, 2, 2])
    with pytest.raises(JaxdiffError, match=r"--class-label must be in \[0, 3\] for this model, got 4"):
        model.labels(2, 4)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
    labels = model.labels(2, 3)
    got = as_denoiser(model.module, model.params)(jnp.asarray(x), jnp.int32(10), labels)
    with torch.no_grad():
        want = unet(nchw(x), 10, class_labels=torch.tensor([3, 3])).sample
    assert rel_err(got, nhwc(want)) <= 1e-5  # float32 through a two-level UNet: measured ~1e-7


def test_load_denoiser_refuses_unknown_schedulers_and_missing_folders(tmp_path):
    from jaxdiff.pipelines.unet_2d import load_denoiser

    with pytest.raises(JaxdiffError, match="unknown scheduler 'ddmi'"):
        load_denoiser(tmp_path / "nope", "ddmi")
    with pytest.raises(JaxdiffError, match="does not exist"):
        load_denoiser(tmp_path / "nope", "ddim")


def test_guided_generator_refuses_an_unknown_variant(pipe):
    with pytest.raises(JaxdiffError, match="unknown guidance variant 'through'"):
        G.guided_generator(pipe["module"], pipe["sched"], 2, G.make_color_loss, variant="through")


# --------------------------------------------------------------------------------------------
# The scripts
# --------------------------------------------------------------------------------------------

def test_color_guidance_script_writes_a_grid(pipe, tmp_path, capsys):
    import json

    from PIL import Image

    from sample import color_guidance

    out = tmp_path / "grid.png"
    color_guidance.main(["--model-dir", str(pipe["folder"]), "--color", "#19e680", "--steps", "3",
                         "--batch-size", "2", "--out", str(out), "--no-compile-cache"])
    summary = json.loads(capsys.readouterr().out)
    assert Image.open(out).size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    assert summary["images"] == 2 and summary["color"] == [0.098, 0.902, 0.502]


@pytest.mark.parametrize("argv, message", [
    (["--color", "purple"], "cannot read the colour 'purple'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--class-label", "3"], "is not class-conditioned; drop --class-label"),
])
def test_color_guidance_script_bad_input_is_one_line(pipe, tmp_path, capsys, argv, message):
    from sample import color_guidance

    with pytest.raises(SystemExit) as e:
        color_guidance.main(["--model-dir", str(pipe["folder"]), "--out", str(tmp_path / "x.png"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_guidance_scale_must_be_a_finite_number(pipe, tmp_path, capsys):
    from sample import clip_guidance, color_guidance

    for program in (color_guidance, clip_guidance):
        with pytest.raises(SystemExit) as e:
            program.parse_args(["--model-dir", str(pipe["folder"]), "--clip-dir", ".", "--prompt", "a",
                                "--guidance-scale", "nan"] if program is clip_guidance else
                               ["--model-dir", str(pipe["folder"]), "--guidance-scale", "inf"])
        assert e.value.code == 2 and "must be a finite number" in capsys.readouterr().err


def test_sample_programs_import_no_other_program():
    """Programs are thin: what two of them share lives in jaxdiff, not in one of them."""
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "sample").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     ["sample." * (node.level > 0) + (node.module or "")] if isinstance(node, ast.ImportFrom)
                     else [])
            assert not any(n.split(".")[0] in ("sample", "train") for n in names), (path.name, names)


def test_scripts_refuse_a_model_folder_that_is_not_a_unet_2d(fixtures_dir, tmp_path, capsys):
    from sample import color_guidance

    with pytest.raises(SystemExit):
        color_guidance.main(["--model-dir", str(fixtures_dir / "tiny-sd-pt-v1" / "vae"),
                             "--out", str(tmp_path / "x.png")])
    assert "holds a AutoencoderKL, not a UNet2DModel" in capsys.readouterr().err


def test_clip_guidance_script_refuses_a_clip_dir_of_the_wrong_kind(pipe, tmp_path, capsys):
    from sample import clip_guidance

    with pytest.raises(SystemExit):
        clip_guidance.main(["--model-dir", str(pipe["folder"]), "--clip-dir", str(pipe["folder"] / "unet"),
                            "--prompt", "a red rose", "--out", str(tmp_path / "x.png")])
    assert "holds a UNet2DModel, not a CLIP model" in capsys.readouterr().err


def test_clip_guidance_script_writes_a_grid(pipe, fixtures_dir, tmp_path, capsys):
    """A tiny CLIPModel folder with the fixtures' tiny tokenizer beside its weights."""
    import json
    import shutil

    from transformers import CLIPConfig, CLIPModel

    from sample import clip_guidance

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=523, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, eos_token_id=522, bos_token_id=521, pad_token_id=522),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16)
    clip_dir = tmp_path / "clip"
    CLIPModel(config).save_pretrained(clip_dir)
    for f in (fixtures_dir / "tiny-sd-pt-v1" / "tokenizer").iterdir():
        shutil.copy(f, clip_dir)
    out = tmp_path / "roses.png"
    clip_guidance.main(["--model-dir", str(pipe["folder"]), "--clip-dir", str(clip_dir), "--prompt", "a red rose:2",
                        "--prompt", "blurry:-1", "--steps", "2", "--batch-size", "1", "--n-cuts", "2",
                        "--out", str(out), "--no-compile-cache"])
    summary = json.loads(capsys.readouterr().out)
    assert out.is_file() and summary["prompts"] == [{"text": "a red rose", "weight": 1.0},
                                                    {"text": "blurry", "weight": -0.5}]


# --------------------------------------------------------------------------------------------
# Through-the-UNet guidance inside a scan stays on XLA's fast convolutions
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride, padding", [(1, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))), (1, "VALID"),
                                             (2, ((0, 1), (0, 1)))])
def test_layers_conv_has_lax_values_and_gradients(stride, padding):
    from jaxdiff.models.layers import conv_general_dilated

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 5)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 5, 7)).astype(np.float32))
    dn = ("NHWC", "HWIO", "NHWC")

    def f(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), padding, dimension_numbers=dn)))

    np.testing.assert_array_equal(f(conv_general_dilated)(x, w), f(jax.lax.conv_general_dilated)(x, w))
    for got, want in zip(jax.grad(f(conv_general_dilated), (0, 1))(x, w),
                         jax.grad(f(jax.lax.conv_general_dilated), (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_through_model_loop_uses_only_canonical_convolutions(pipe, x_T, run_guided):
    """XLA:CPU runs convolutions whose kernel is laid out in/out-swapped (`01oi`) with a naive
    emitter, ~7x slower; `layers.conv_general_dilated` keeps autodiff's input-gradient
    convolutions inside the sampling scan in the canonical `01io` layout."""
    import re

    if jax.default_backend() != "cpu":
        pytest.skip("a property of XLA:CPU's convolution emitter")
    schedule = G.guidance_schedule("constant", pipe["state"].alphas_cumprod)
    hlo = run_guided.lower(pipe["params"], x_T, jax.random.key(0), jnp.asarray(TARGET), 1.0, schedule,
                           "through_model").compile().as_text()
    labels = re.findall(r"dim_labels=(\w+_\w+->\w+)", hlo)
    assert labels and set(labels) == {"b01f_01io->b01f"}
