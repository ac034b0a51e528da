"""Flax CLIP against transformers' PyTorch CLIP: same weights → same embeddings.

Reference: transformers `CLIPModel` / `CLIPTextModel` / `CLIPVisionModelWithProjection` in float32
on CPU, built from tiny configs with a fixed seed and `save_pretrained` into tmp folders, so that
jaxdiff's real loading code runs. Tolerance: 1e-4 relative (max-abs error over max-abs value),
which float32 with matmul precision "highest" meets with room to spare.
"""
from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest
import torch

from helpers import nchw, rel_err
from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError
from jaxdiff.models import clip as C
from jaxdiff.tokenizer import PromptTruncatedWarning, load_tokenizer, tokenize

RTOL = 1e-4
VOCAB = 99  # token 98 is the end-of-text token: the highest id, as in OpenAI's vocabulary
EOS = VOCAB - 1


def text_config(**kw) -> dict:
    # hidden 128 / 2 heads: 64-dimensional heads, which the open_clip layout implies
    return dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=EOS - 1,
                eos_token_id=EOS, pad_token_id=0, projection_dim=48, **kw)


def vision_config(**kw) -> dict:
    return dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8, projection_dim=48, **kw)


def token_ids(batch=3, length=16, seed=0) -> np.ndarray:
    """Start token, random words, end token, zero padding (open_clip's padding)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    for i in range(batch):
        n = rng.integers(3, length - 1)
        ids[i, 0] = EOS - 1
        ids[i, 1:n] = rng.integers(1, EOS - 1, n - 1)
        ids[i, n] = EOS
    return ids


def images(batch=2, size=32, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=text_config(), vision_config=vision_config(),
                        projection_dim=48)
    model = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def torch_features(torch_clip):
    model, _ = torch_clip
    ids, pixels = token_ids(), images()
    with torch.no_grad():
        text = model.get_text_features(torch.from_numpy(ids).long()).pooler_output.numpy()
        image = model.get_image_features(nchw(pixels)).pooler_output.numpy()
    return ids, pixels, text, image


@pytest.fixture(scope="module")
def features_fn():
    """One jitted function for every CLIPModel test (the module is static)."""
    def features(params, ids, pixels, module):
        apply = lambda method, x: module.apply({"params": params}, x, method=method)  # noqa: E731
        return apply(module.get_text_features, ids), apply(module.get_image_features, pixels)
    return jax.jit(features, static_argnums=3)


def test_clipmodel_folder_gives_transformers_embeddings(torch_clip, torch_features, features_fn):
    _, folder = torch_clip
    ids, pixels, want_text, want_image = torch_features
    module, params = C.load_clip(folder)
    assert isinstance(module, C.CLIPModel)
    text, image = features_fn(params, ids, pixels, module)
    assert rel_err(text, want_text) <= RTOL
    assert rel_err(image, want_image) <= RTOL


def test_clipmodel_logits_match_transformers(torch_clip):
    model, folder = torch_clip
    ids, pixels = token_ids(), images()
    module, params = C.load_clip(folder)
    logits, _, _ = jax.jit(module.apply)({"params": params}, ids, pixels)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids).long(), pixel_values=nchw(pixels)).logits_per_image
    assert logits.shape == (2, 3)
    assert rel_err(logits, want.numpy()) <= RTOL


def test_padding_attention_mask_matches_transformers(torch_clip):
    model, folder = torch_clip
    ids = token_ids()
    mask = (np.arange(ids.shape[1])[None] <= np.argmax(ids == EOS, axis=1)[:, None]).astype(np.int32)
    module, params = C.load_clip(folder)
    out = module.apply({"params": params}, ids, mask, method=lambda m, i, a: m.text_model(i, a))
    with torch.no_grad():
        want = model.text_model(input_ids=torch.from_numpy(ids).long(),
                                attention_mask=torch.from_numpy(mask).long())
    # padded positions attend to nothing valid in both; compare the real tokens and the pooled one
    real = mask.astype(bool)
    assert rel_err(np.asarray(out.last_hidden_state)[real], want.last_hidden_state.numpy()[real]) <= RTOL
    assert rel_err(out.pooler_output, want.pooler_output.numpy()) <= RTOL


def test_hidden_states_and_clip_skip_follow_transformers_and_diffusers(torch_clip):
    model, folder = torch_clip
    ids = token_ids()
    module, params = C.load_clip(folder)
    text = lambda m, i, skip: m.text_model(i, output_hidden_states=True, clip_skip=skip)  # noqa: E731
    out = module.apply({"params": params}, ids, None, method=text)
    skipped = module.apply({"params": params}, ids, 1, method=text)
    with torch.no_grad():
        want = model.text_model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
        # diffusers' encode_prompt with clip_skip=1: hidden_states[-(clip_skip + 1)] + final_layer_norm
        want_skip = model.text_model.final_layer_norm(want.hidden_states[-2])
    assert len(out.hidden_states) == len(want.hidden_states) == 4
    for got, ref in zip(out.hidden_states, want.hidden_states):
        assert rel_err(got, ref.numpy()) <= RTOL
    assert rel_err(skipped.last_hidden_state, want_skip.numpy()) <= RTOL
    assert rel_err(skipped.pooler_output, want.pooler_output.numpy()) <= RTOL


@pytest.mark.parametrize("architecture", ["CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"])
def test_single_tower_folders_load_with_their_projection(tmp_path, architecture):
    import transformers

    torch.manual_seed(1)
    if architecture.startswith("CLIPText"):
        config = transformers.CLIPTextConfig(**text_config())
        x = token_ids()
        torch_x = torch.from_numpy(x).long()
    else:
        config = transformers.CLIPVisionConfig(**vision_config())
        x = images()
        torch_x = nchw(x)
    model = getattr(transformers, architecture)(config).eval()
    model.save_pretrained(tmp_path)
    module, params = C.load_clip(tmp_path)
    assert type(module).__name__ == architecture
    method = module.get_text_features if architecture.startswith("CLIPText") else module.get_image_features
    got = module.apply({"params": params}, x, method=method)
    with torch.no_grad():
        out = model(torch_x)
    want = out.text_embeds if architecture.startswith("CLIPText") else out.image_embeds
    assert rel_err(got, want.numpy()) <= RTOL


# --------------------------------------------------------------------------------------------
# The tiny Stable Diffusion text encoders (transformers Flax msgpack and PyTorch safetensors)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_prompt_ids(fixtures_dir):
    tokenizer = load_tokenizer(fixtures_dir / "tiny-sd-pt-v1")
    return tokenize(tokenizer, ["a photo of an astronaut riding a horse", "", "a red apple"])


def torch_text_encoder_output(folder, ids):
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long())
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("pipeline", ["tiny-sd-flax-v1", "tiny-sd-pt-v1"])
def test_sd1_text_encoder_fixtures_match_transformers(fixtures_dir, sd_prompt_ids, pipeline):
    want_last, want_pooled = torch_text_encoder_output(fixtures_dir / "tiny-sd-pt-v1" / "text_encoder",
                                                       sd_prompt_ids)
    module, params = C.load_clip_text_encoder(fixtures_dir / pipeline)
    assert isinstance(module, C.CLIPTextModel)
    out = jax.jit(module.apply)({"params": params}, sd_prompt_ids)
    assert out.last_hidden_state.shape == (3, 77, 32)
    assert rel_err(out.last_hidden_state, want_last) <= RTOL
    assert rel_err(out.pooler_output, want_pooled) <= RTOL


def test_sd2_text_encoder_fixture_matches_transformers(fixtures_dir, tmp_path):
    """The SD2-like fixture (gelu, pad token '!'): its msgpack weights, moved into transformers'
    CLIPTextModel, give the same outputs; and that model saved by transformers v5 (which drops the
    `text_model.` prefix) loads back."""
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = fixtures_dir / "tiny-sd-flax-v2"
    ids = tokenize(load_tokenizer(folder), ["a photo of an astronaut riding a horse", "a red apple"])
    assert (ids[:, -1] == 0).all()  # padded with '!' (id 0), not the end-of-text token
    module, params = C.load_clip_text_encoder(folder)
    assert module.config.hidden_act == "gelu"
    out = module.apply({"params": params}, ids)
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")).eval()
    state = {k.removeprefix("text_model."): torch.tensor(v) for k, v in W.flax_to_torch_state(params).items()}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        want = model(torch.from_numpy(ids).long())
    assert rel_err(out.last_hidden_state, want.last_hidden_state.numpy()) <= RTOL
    assert rel_err(out.pooler_output, want.pooler_output.numpy()) <= RTOL

    model.save_pretrained(tmp_path)
    module, reloaded = C.load_clip(tmp_path)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, reloaded, params))


# --------------------------------------------------------------------------------------------
# OpenAI / open_clip layout
# --------------------------------------------------------------------------------------------

def transformers_to_open_clip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of the loader's mapping, written out independently: transformers CLIPModel
    names → OpenAI/open_clip names (`visual.transformer.resblocks.N.attn.in_proj_weight`, ...)."""
    out: dict[str, np.ndarray] = {}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    fixed = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for name, value in state.items():
        if name in fixed:
            out[fixed[name]] = value
        elif name == "visual_projection.weight":
            out["visual.proj"] = value.T.copy()
        elif name == "text_projection.weight":
            out["text_projection"] = value.T.copy()
        else:
            tower, _, _, i, rest = name.split(".", 4)
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            module, _, leaf = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{prefix}attn.in_proj_{leaf}", {})[module[-6]] = value
            else:
                out[prefix + block[module] + "." + leaf] = value
    for name, parts in qkv.items():
        out[name] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    out["attn_mask"] = np.triu(np.full((16, 16), -np.inf, np.float32), 1)  # a buffer open_clip saves
    return out


@pytest.fixture(scope="module")
def open_clip_file(torch_clip, tmp_path_factory):
    model, _ = torch_clip
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    path = tmp_path_factory.mktemp("open_clip") / "open_clip_model.safetensors"
    W.save_safetensors(transformers_to_open_clip(state), path)
    return path


def test_open_clip_state_dict_gives_transformers_embeddings(open_clip_file, torch_features, features_fn):
    ids, pixels, want_text, want_image = torch_features
    module, params = C.load_clip(open_clip_file)  # OpenAI's quick_gelu, as the reference uses
    c = module.config
    assert (c.text_config.num_hidden_layers, c.vision_config.num_hidden_layers) == (3, 2)
    assert (c.text_config.num_attention_heads, c.vision_config.image_size, c.projection_dim) == (2, 32, 48)
    text, image = features_fn(params, ids, pixels, module)
    assert rel_err(text, want_text) <= RTOL
    assert rel_err(image, want_image) <= RTOL


def test_open_clip_folder_reads_activation_from_open_clip_config(open_clip_file):
    folder = open_clip_file.parent
    assert C.load_clip(folder)[0].config.text_config.hidden_act == "quick_gelu"  # OpenAI's default
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 48}}))
    assert C.load_clip(folder)[0].config.vision_config.hidden_act == "gelu"


def vit_b_32_state() -> dict[str, np.ndarray]:
    """Every name and shape of OpenAI's ViT-B/32 state dict (zero-stride arrays: no memory)."""
    shapes = {"positional_embedding": (77, 512), "text_projection": (512, 512), "logit_scale": (),
              "token_embedding.weight": (49408, 512), "ln_final.weight": (512,), "ln_final.bias": (512,),
              "visual.class_embedding": (768,), "visual.positional_embedding": (50, 768),
              "visual.proj": (768, 512), "visual.conv1.weight": (768, 3, 32, 32),
              "visual.ln_pre.weight": (768,), "visual.ln_pre.bias": (768,),
              "visual.ln_post.weight": (768,), "visual.ln_post.bias": (768,)}
    for prefix, d in (("transformer.resblocks", 512), ("visual.transformer.resblocks", 768)):
        for i in range(12):
            p = f"{prefix}.{i}."
            shapes |= {p + "attn.in_proj_weight": (3 * d, d), p + "attn.in_proj_bias": (3 * d,),
                       p + "attn.out_proj.weight": (d, d), p + "attn.out_proj.bias": (d,),
                       p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,),
                       p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (4 * d, d),
                       p + "mlp.c_fc.bias": (4 * d,), p + "mlp.c_proj.weight": (d, 4 * d),
                       p + "mlp.c_proj.bias": (d,)}
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def test_vit_b_32_layout_maps_onto_every_parameter_with_its_shape():
    state = vit_b_32_state()
    config = C.open_clip_config(state)
    assert config.vision_config == C.CLIPVisionConfig()  # transformers' defaults are ViT-B/32
    t = config.text_config
    assert (t.vocab_size, t.hidden_size, t.num_attention_heads, t.num_hidden_layers,
            t.max_position_embeddings, config.projection_dim) == (49408, 512, 8, 12, 77, 512)
    template = W.flatten(C.param_shapes(C.CLIPModel(config)))
    mapped = list(C.open_clip_to_transformers(state.items()))
    flat = {}
    for name, value in mapped:
        path = next(p for p in W._candidate_paths(name) if p in template)
        flat[path] = W.torch_to_flax_array(value, path[-1], template[path].shape).shape
    assert flat == {p: s.shape for p, s in template.items()}


# --------------------------------------------------------------------------------------------
# Bad input and the tokenizer
# --------------------------------------------------------------------------------------------

def test_a_unet_folder_is_refused_with_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    with pytest.raises(JaxdiffError, match="holds a UNet2DModel, not a CLIP model"):
        C.load_clip(tmp_path)


def test_a_state_dict_that_is_not_clip_is_refused(tmp_path):
    W.save_safetensors({"conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)}, tmp_path / "x.safetensors")
    with pytest.raises(JaxdiffError, match="not an OpenAI/open_clip ViT CLIP state dict"):
        C.load_clip(tmp_path / "x.safetensors")


def test_images_of_the_wrong_size_are_refused(torch_clip):
    module, params = C.load_clip(torch_clip[1])
    with pytest.raises(JaxdiffError, match=r"CLIP expects images of shape \(B, 32, 32, 3\)"):
        module.apply({"params": params}, images(size=24), method=module.get_image_features)


@pytest.mark.parametrize("pipeline", ["tiny-sd-flax-v1", "tiny-sd-flax-v2"])
def test_tokenize_pads_as_transformers_does(fixtures_dir, pipeline):
    from transformers import CLIPTokenizer

    folder = fixtures_dir / pipeline / "tokenizer"
    prompts = ["a photo of an astronaut", "a red apple on a table"]
    want = CLIPTokenizer.from_pretrained(folder)(prompts, padding="max_length", max_length=77,
                                                 truncation=True).input_ids
    ids = tokenize(load_tokenizer(folder), prompts)
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    np.testing.assert_array_equal(ids, np.array(want))


def test_a_long_prompt_is_truncated_with_a_warning(fixtures_dir):
    tokenizer = load_tokenizer(fixtures_dir / "tiny-sd-pt-v1")
    long_prompt = "a photo of an astronaut riding a horse " * 10 + "on the moon"
    with pytest.warns(PromptTruncatedWarning, match="truncated: .*on the moon"):
        ids = tokenize(tokenizer, [long_prompt, "short"])
    assert ids.shape == (2, 77) and ids[0, -1] == tokenizer.eos_token_id
    want = tokenizer([long_prompt, "short"], padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ids, np.array(want))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(tokenizer, "short")


def test_tokenize_from_many_threads_gives_what_one_thread_gives(fixtures_dir):
    """The caption loader tokenizes in worker threads; the fast tokenizer's padding settings are
    shared mutable state, so concurrent calls must not see each other's settings."""
    import concurrent.futures

    tokenizer = load_tokenizer(fixtures_dir / "tiny-sd-pt-v1")
    batches = [[f"a {c} square number {i}" for c in ("red", "green", "blue")[: 1 + i % 3]] for i in range(64)]
    want = [tokenize(tokenizer, b) for b in batches]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            got = list(pool.map(lambda b: tokenize(tokenizer, b), batches))
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


def test_a_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(JaxdiffError, match="no CLIP tokenizer"):
        load_tokenizer(tmp_path)
