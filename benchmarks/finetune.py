"""train.finetune on this machine: its images/s against the course's PyTorch fine-tuning loop, and
the course's fine-tuning story on MNIST, in one run.

1. Throughput. The same UNet2DModel config and batch on both sides: the unit-2 notebook's loop
   (diffusers UNet2DModel + DDPMScheduler + AdamW: noise, random timesteps, add_noise, MSE,
   backward, an optimizer step every `--grad-accum` micro-batches) timed over `--steps` micro-
   batches (before and after the jaxdiff run; the faster round counts), against the images/s that
   `python -m train.finetune` reports for the same number of updates (compilation excluded).
2. The story. MNIST digits (IDX files from `--mnist-dir`, else the copy shipped with jaxdiff)
   written as image folders (all digits; the 7s alone); an unconditional model trained on all
   digits with `train.finetune --config` and exported; then fine-tuned on the 7s with
   `train.finetune --model-dir` for at most `--finetune-minutes`; `--samples` digits from each,
   read by the bundled digit classifier: the share of 7s before and after, and the before/after
   grids as PNG. The step counts are sized from the throughput measured in part 1 so the runs fit
   `--base-minutes` and `--finetune-minutes` on this machine as loaded now.

    nice python benchmarks/finetune.py --mnist-dir ../shared/data/mnist --out runs/finetune_bench
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNET = dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=[16, 32, 32], layers_per_block=1,
            norm_num_groups=8, down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], attention_head_dim=8)
SEVEN = 7


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist-dir", default=None, help="MNIST IDX folder (default: the copy shipped with jaxdiff)")
    p.add_argument("--out", default="runs/finetune_bench", help="working folder (image folders, runs, grids)")
    p.add_argument("--batch", type=int, default=64, help="images per update (default 64)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per update on both sides (default 1; the course's notebook uses 2, "
                        "which XLA's CPU backend runs ~5x slower per image as a scan)")
    p.add_argument("--steps", type=int, default=20, help="updates timed in part 1 (default 20)")
    p.add_argument("--base-minutes", type=float, default=9.0, help="wall-clock budget of the base model's run")
    p.add_argument("--finetune-minutes", type=float, default=9.0,
                   help="wall-clock budget of the fine-tuning run, compilation included (the bar: <= 10)")
    p.add_argument("--samples", type=int, default=200, help="digits sampled from each model")
    p.add_argument("--sample-steps", type=int, default=40, help="DDIM steps of those samples")
    p.add_argument("--torch-rounds", type=int, default=2, help="PyTorch rounds: before, and after, the jaxdiff run")
    p.add_argument("--no-story", action="store_true", help="part 1 only")
    p.add_argument("--no-throughput", action="store_true", help="part 2 only")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    return p.parse_args(argv)


def write_folders(data, out: Path) -> tuple[Path, Path]:
    """MNIST as two flat PNG folders: every digit, and the 7s alone."""
    from PIL import Image

    all_dir, sevens = out / "mnist_all", out / "mnist_7"
    if not (all_dir / "done").is_file():
        for d in (all_dir, sevens):
            d.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(data.images, data.labels)):
            Image.fromarray(image[..., 0]).save(all_dir / f"{i:05d}.png")
            if label == SEVEN:
                Image.fromarray(image[..., 0]).save(sevens / f"{i:05d}.png")
        (all_dir / "done").write_text("")
    return all_dir, sevens


# ------------------------------------------------------------------------------------------------
# The course's PyTorch fine-tuning loop (unit 2)
# ------------------------------------------------------------------------------------------------

def torch_loop(images, batch: int, grad_accum: int, micro_batches: int) -> float:
    """images/s of the notebook's loop over `micro_batches` micro-batches (after one warm-up)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**UNET)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    micro = batch // grad_accum
    rng = np.random.default_rng(0)
    data = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)

    def run(n):
        for step in range(n):
            clean_images = data[rng.integers(0, len(data), micro)]
            noise = torch.randn(clean_images.shape)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (micro,)).long()
            noisy_images = scheduler.add_noise(clean_images, noise, timesteps)
            noise_pred = unet(noisy_images, timesteps, return_dict=False)[0]
            loss = F.mse_loss(noise_pred, noise)
            loss.backward(loss)
            if (step + 1) % grad_accum == 0:
                optimizer.step()
                optimizer.zero_grad()

    run(grad_accum)
    t0 = time.perf_counter()
    run(micro_batches)
    return micro_batches * micro / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# jaxdiff
# ------------------------------------------------------------------------------------------------

def finetune(*args, minutes: float | None = None) -> tuple[dict, float]:
    """Run train.finetune; (its JSON summary, wall seconds). With `minutes`, a run still going
    then is stopped by SIGTERM (it checkpoints the step it reached) and finished there with
    --resume --steps N (no more training: the export), so training never runs past the budget."""
    command = [sys.executable, "-m", "train.finetune", "--no-progress", "--log-backend", "jsonl", *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=None if minutes is None else 60 * minutes)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode == 128 + signal.SIGTERM:
        step = int(err.split("stopped at step ")[1].split(";")[0])
        run_dir = args[list(args).index("--out") + 1]
        summary, _ = finetune("--out", run_dir, "--resume", "--steps", step, "--no-samples",
                              "--grad-accum", args[list(args).index("--grad-accum") + 1])
        logged = [json.loads(line) for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]
        rates = [r["images_per_s"] for r in logged if r.get("images_per_s")]
        return {**summary, "steps": step, "stopped_by_budget": True, "train_seconds": None,
                "images_per_s": rates[-1] if rates else None}, seconds
    if proc.returncode:
        raise SystemExit(f"train.finetune failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), seconds


def sample_sevens(run_dir: Path, n: int, steps: int, classifier, grid_path: Path) -> float:
    """Share of `n` DDIM samples of the exported pipeline in `run_dir` that the classifier reads
    as 7; the first 64 saved as a grid."""
    import jax
    import numpy as np

    from jaxdiff.eval.digit_classifier import classify
    from jaxdiff.images import save_grid
    from jaxdiff.pipelines.unet_2d import load_denoiser
    from jaxdiff.sampling import as_apply_fn, make_sampler

    model = load_denoiser(run_dir, "ddim")
    run = make_sampler(as_apply_fn(model.module), model.scheduler, steps)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (n, *model.sample_shape))
    images = np.asarray(run(model.params, x_T, jax.random.PRNGKey(1)))
    unit = np.clip(images * 0.5 + 0.5, 0.0, 1.0)
    save_grid(unit[:64], grid_path, nrow=8, value_range="unit")
    return float(np.mean(classify(classifier, unit) == SEVEN))


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    from jaxdiff.data.mnist import load_mnist
    from jaxdiff.weights import save_json

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = load_mnist(args.mnist_dir, use_hf=False)
    all_dir, sevens = write_folders(data, out)
    config = out / "unet_config.json"
    save_json({"_class_name": "UNet2DModel", **UNET}, config)
    common = ["--batch-size", args.batch, "--grad-accum", args.grad_accum]
    figures: dict = {"data": data.source, "images": len(data), "sevens": int((data.labels == SEVEN).sum()),
                     "batch": args.batch, "grad_accum": args.grad_accum}

    for run in ("throughput", "base", "finetuned_7"):  # fresh runs every time
        shutil.rmtree(out / run, ignore_errors=True)
    if not args.no_throughput:
        throughput(args, data, config, all_dir, common, figures)
    if args.no_story:
        print(json.dumps(figures))
        return
    story(args, data, config, all_dir, sevens, common, figures, out)


def throughput(args, data, config, all_dir, common, figures):
    """Part 1: images/s of the PyTorch loop (before and after) and of train.finetune."""
    out = Path(args.out).absolute()
    micro_batches = args.steps * args.grad_accum
    torch_rounds = [torch_loop(data.images, args.batch, args.grad_accum, micro_batches)]
    summary, _ = finetune("--config", config, "--train-data", all_dir, "--out", out / "throughput", "--steps",
                          args.steps, "--beta-schedule", "squaredcos_cap_v2", "--no-samples", "--no-export",
                          "--checkpoint-every", 10 ** 6, *common)
    jax_ips = summary["images_per_s"]
    if args.torch_rounds > 1:
        torch_rounds.append(torch_loop(data.images, args.batch, args.grad_accum, micro_batches))
    figures.update(jax_images_per_s=jax_ips, torch_images_per_s=[round(r, 1) for r in torch_rounds],
                   ratio=round(jax_ips / max(torch_rounds), 3))
    print(f"images/s: train.finetune {jax_ips:.1f}, the course's PyTorch loop {max(torch_rounds):.1f} "
          f"(rounds {', '.join(f'{r:.1f}' for r in torch_rounds)}): {jax_ips / max(torch_rounds):.2f}x",
          file=sys.stderr, flush=True)


def story(args, data, config, all_dir, sevens, common, figures, out):
    """Part 2: a base model on all digits, fine-tuned on the 7s; the share of 7s before/after."""
    from jaxdiff.eval.digit_classifier import load_or_train

    classifier, holdout = load_or_train(data)
    big = 10 ** 6  # the runs stop at their time budget (SIGTERM), checkpointing where they are
    base, ft = out / "base", out / "finetuned_7"
    base_summary, base_seconds = finetune(
        "--config", config, "--train-data", all_dir, "--out", base, "--steps", big, "--lr", "1e-3",
        "--ema-decay", "0.999", "--beta-schedule", "squaredcos_cap_v2", "--no-samples", *common,
        minutes=args.base_minutes)
    before = sample_sevens(base, args.samples, args.sample_steps, classifier, out / "before.png")
    ft_summary, ft_seconds = finetune(
        "--model-dir", base, "--train-data", sevens, "--out", ft, "--steps", big, "--lr", "1e-3",
        "--ema-decay", "0.99", "--no-samples", *common, minutes=args.finetune_minutes)
    after = sample_sevens(ft, args.samples, args.sample_steps, classifier, out / "after.png")
    figures.update(classifier_holdout=round(holdout, 4),
                   base={"steps": base_summary["steps"], "wall_s": round(base_seconds, 1),
                         "train_s": base_summary["train_seconds"], "images_per_s": base_summary["images_per_s"]},
                   finetune={"steps": ft_summary["steps"], "wall_s": round(ft_seconds, 1),
                             "train_s": ft_summary["train_seconds"], "images_per_s": ft_summary["images_per_s"]},
                   sevens_before=round(before, 3), sevens_after=round(after, 3),
                   grids=[str(out / "before.png"), str(out / "after.png")])
    print(f"base: {base_summary['steps']} steps in {base_seconds:.0f} s; fine-tuned on the 7s: "
          f"{ft_summary['steps']} steps in "
          f"{ft_seconds:.0f} s (wall, compile included); sevens among {args.samples} samples: "
          f"{before:.0%} before, {after:.0%} after", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
