"""Steer any diffusers UNet2DModel towards text prompts with CLIP guidance.

    python -m sample.clip_guidance --model-dir ./sd-class-wikiart-from-bedrooms \\
        --clip-dir ./clip-vit-base-patch32 --prompt "Red Rose (still life), red flower painting" \\
        --guidance-scale 8 --steps 50 --batch-size 4 --out roses.png
    python -m sample.clip_guidance --model-dir ./ddpm-church-256 --clip-dir ./open_clip_model.safetensors \\
        --tokenizer-dir ./clip-vit-base-patch32 --prompt "a gothic cathedral:1" --prompt "blurry:-0.3" ...

The course's CLIP guidance (unit 2): at every step the predicted clean image is cut into
`--n-cuts` randomly cropped, rotated and flipped views at CLIP's input size (one vmapped batch),
embedded by CLIP, and x is nudged down the gradient of the squared great-circle distance to the
prompts' embeddings, weighted by √ᾱ_t by default. Prompts take an optional weight after a colon;
negative weights push away. `--clip-dir` is a transformers CLIPModel folder or an OpenAI/open_clip
ViT state dict (`*.safetensors`, or a folder with `open_clip_model.safetensors`; give
`--tokenizer-dir` then, a folder with the CLIP tokenizer's vocab.json and merges.txt).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from jaxdiff.cli import at_least, program_main, program_parser
from jaxdiff.errors import JaxdiffError
from jaxdiff.pipelines.unet_2d import add_guidance_flags, check_guidance_flags


def parse_args(argv=None) -> argparse.Namespace:
    p = program_parser("python -m sample.clip_guidance", __doc__)
    add_guidance_flags(p, steps=50, scale=8.0, schedule="sqrt_alpha_bar")
    p.add_argument("--clip-dir", required=True,
                   help="transformers CLIPModel folder, or an open_clip ViT *.safetensors (or its folder)")
    p.add_argument("--tokenizer-dir", default=None,
                   help="CLIP tokenizer folder (default: the CLIP folder, or its tokenizer/ subfolder)")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt, optionally weighted 'text:weight'; repeat for several")
    p.add_argument("--n-cuts", type=int, default=4, help="augmented cutouts per image and step (default 4)")
    p.add_argument("--out", default="clip_guidance.png", help="PNG file for the grid")
    return p.parse_args(argv)


def load_clip_and_tokenizer(clip_dir: str, tokenizer_dir: str | None):
    from jaxdiff.models.clip import CLIPModel, load_clip
    from jaxdiff.tokenizer import load_tokenizer

    module, params = load_clip(clip_dir)
    if not isinstance(module, CLIPModel):
        raise JaxdiffError(f"{clip_dir} holds a {type(module).__name__}; CLIP guidance needs both towers "
                           "(a CLIPModel folder or an open_clip state dict)")
    clip_path = Path(clip_dir).expanduser()
    where = Path(tokenizer_dir).expanduser() if tokenizer_dir else (clip_path if clip_path.is_dir() else clip_path.parent)
    try:
        tokenizer = load_tokenizer(where)
    except JaxdiffError as e:
        hint = "" if tokenizer_dir else "; pass --tokenizer-dir (e.g. the tokenizer of openai/clip-vit-base-patch32)"
        raise JaxdiffError(f"{e}{hint}") from None
    return module, params, tokenizer


def clip_loss_maker(args, clip):
    """`make_loss((clip params, prompt embeddings, weights))` for `--n-cuts` cutouts at CLIP's size."""
    from jaxdiff.guidance import make_clip_loss

    size = clip.config.vision_config.image_size
    size = size if isinstance(size, int) else size[0]

    def make_loss(loss_args):
        p, embeds, w = loss_args
        features = lambda im: clip.apply({"params": p}, im, method=clip.get_image_features)  # noqa: E731
        return make_clip_loss(features, embeds, w, n_cuts=args.n_cuts, size=size)

    return make_loss


def run(args) -> dict:
    check_guidance_flags(args)
    at_least(args, 1, "n_cuts")
    import jax
    import jax.numpy as jnp

    from jaxdiff.guidance import encode_prompts, parse_prompts
    from jaxdiff.pipelines.unet_2d import load_denoiser, run_guided
    from jaxdiff.tokenizer import tokenize

    texts, weights = parse_prompts(args.prompt)
    model = load_denoiser(args.model_dir, args.scheduler)
    cond = model.labels(args.batch_size, args.class_label)
    if model.sample_shape[-1] != 3:
        raise JaxdiffError(f"CLIP guidance needs an RGB model; {args.model_dir} makes "
                           f"{model.sample_shape[-1]}-channel images")
    clip, clip_params, tokenizer = load_clip_and_tokenizer(args.clip_dir, args.tokenizer_dir)
    ids = tokenize(tokenizer, texts, max_length=clip.config.text_config.max_position_embeddings)
    text_embeds = jax.jit(encode_prompts, static_argnums=0)(clip, clip_params, ids)
    make_loss = clip_loss_maker(args, clip)
    loss_args = (clip_params, text_embeds, jnp.asarray(weights))
    plain = make_loss(loss_args)
    result = run_guided(args, model, cond, make_loss, loss_args,
                        lambda x0: plain(x0, jax.random.PRNGKey(args.seed + 1)))
    result["prompts"] = [{"text": t, "weight": round(float(w), 4)} for t, w in zip(texts, weights)]
    return result


main = program_main(parse_args, run)


if __name__ == "__main__":
    main()
