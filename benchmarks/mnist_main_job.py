"""The main job's bar: `python -m train.mnist` with no flags but `--out`/`--seed`, from a cold
compilation cache, then 100 samples (10 per digit) with the sampler, steps and guidance the run
writes samples.png with, read by the bundled digit classifier; next to them the per-digit
diversity (mean pairwise pixel L2 distance) relative to real test-set digits of the same class.

    python benchmarks/mnist_main_job.py                       # seeds 0,1,2 into runs/main-job
    python benchmarks/mnist_main_job.py --seeds 0 --out /tmp/mj
    python benchmarks/mnist_main_job.py --skip-train --out runs/main-job   # evaluate existing runs
    python benchmarks/mnist_main_job.py --skip-train --samplers ddim:40:3,ddpm:100:3   # other samplers

`--samplers NAME:STEPS:GUIDANCE,...` judges the same runs with other samplers too (one table
row per run and sampler; the bars apply to the default, the one samples.png is written with).

Each training run gets an empty XLA cache folder (a fresh machine's first run); the wall time is
the whole command's, measured around the process (imports, data, compile, training,
samples.png). Bars (issue 11): accuracy median ≥ 97% and minimum ≥ 95% over the seeds, the
smallest per-digit diversity ratio ≥ 0.8, wall time ≤ 600 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARS = {"median_accuracy": 0.97, "min_accuracy": 0.95, "min_diversity_ratio": 0.8, "max_wall_seconds": 600.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--out", default="runs/main-job", help="folder for the runs (OUT/seed-S)")
    p.add_argument("--skip-train", action="store_true", help="evaluate the runs already in OUT")
    p.add_argument("--per-class", type=int, default=10, help="samples per digit judged")
    p.add_argument("--samplers", default="", help="also judge with these NAME:STEPS:GUIDANCE samplers")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    return p.parse_args(argv)


def train(run_dir: Path, seed: int) -> dict:
    """Run the default command in a fresh process with an empty compilation cache."""
    with tempfile.TemporaryDirectory(prefix="jaxdiff-cold-cache-") as cache:
        env = {**os.environ, "JAXDIFF_CACHE_DIR": cache}
        cmd = [sys.executable, "-m", "train.mnist", "--out", str(run_dir), "--seed", str(seed)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"training seed {seed} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_seconds": round(wall, 1), **{k: summary.get(k) for k in
            ("steps", "train_seconds", "images_per_s", "compile_seconds", "sample_seconds")}}


def default_sampler() -> str:
    """NAME:STEPS:GUIDANCE of samples.png in the default command."""
    from jaxdiff.pipelines.class_conditioned import DEFAULT_GUIDANCE
    from jaxdiff.training.configs import MnistSettings

    s = MnistSettings()
    guidance = s.guidance_scale if s.guidance_scale is not None else DEFAULT_GUIDANCE
    return f"{s.sample_scheduler}:{s.sample_steps}:{guidance:g}"


def evaluate(run_dir: Path, seed: int, per_class: int, classifier, real, sampler: str) -> dict:
    """Accuracy and diversity of `per_class` samples per digit with `sampler` (NAME:STEPS:GUIDANCE)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.eval.digit_classifier import classify
    from jaxdiff.eval.diversity import diversity_ratios
    from jaxdiff.pipelines.class_conditioned import class_labels, load_run, make_generator

    model, params, run = load_run(run_dir)
    name, steps, guidance = sampler.split(":")
    guidance = float(guidance) if model.null_label is not None else 1.0
    labels = class_labels(model.num_classes, per_class)
    generate = make_generator(model, run.sampler(name), int(steps), use_cfg=guidance != 1.0)
    t0 = time.perf_counter()
    images = np.asarray(generate(params, labels, jax.random.PRNGKey(seed), jnp.float32(guidance)))
    predicted = classify(classifier, images)
    ratios = diversity_ratios(images, labels, *real)
    return {"accuracy": float(np.mean(predicted == labels)),
            "per_digit": [round(float(np.mean(predicted[labels == c] == c)), 2) for c in range(model.num_classes)],
            "min_diversity_ratio": round(min(ratios.values()), 3),
            "mean_diversity_ratio": round(float(np.mean(list(ratios.values()))), 3),
            "sample_seconds": round(time.perf_counter() - t0, 1), "sampler": sampler}


def main(argv=None) -> bool:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from jaxdiff.data.mnist import load_mnist
    from jaxdiff.eval.digit_classifier import load_or_train

    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    trained = {}
    for seed in seeds:
        if not args.skip_train:
            print(f"training seed {seed} (cold cache)...", file=sys.stderr, flush=True)
            trained[seed] = train(out / f"seed-{seed}", seed)
    data = load_mnist(None, use_hf=False, verbose=False)
    classifier, holdout = load_or_train(data)
    default = default_sampler()
    samplers = [default] + [s for s in args.samplers.split(",") if s and s != default]
    rows = []
    for seed in seeds:
        for sampler in samplers:
            rows.append({"seed": seed, **trained.get(seed, {}), **evaluate(
                out / f"seed-{seed}", seed, args.per_class, classifier, (data.images, data.labels), sampler)})
    import numpy as np

    table = rows
    rows = [r for r in rows if r["sampler"] == default]  # the bars: the default command's samples
    accs = [r["accuracy"] for r in rows]
    result = {"median_accuracy": float(np.median(accs)), "min_accuracy": min(accs),
              "min_diversity_ratio": min(r["min_diversity_ratio"] for r in rows)}
    if trained:
        result["max_wall_seconds"] = max(r["wall_seconds"] for r in rows)
    print(f"digit classifier: {holdout:.1%} on held-out MNIST; the default sampler: {default}")
    print("| seed | wall s | train s | img/s | sampler | sample s | accuracy | per digit 0-9 | diversity min / mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['seed']} | {r.get('wall_seconds', '-')} | {r.get('train_seconds', '-')} | "
              f"{r.get('images_per_s', '-')} | {r['sampler']} | {r['sample_seconds']} | {r['accuracy']:.0%} | "
              f"{' '.join(f'{a:.1f}' for a in r['per_digit'])} | "
              f"{r['min_diversity_ratio']:.2f} / {r['mean_diversity_ratio']:.2f} |")
    ok = True
    for name, value in result.items():
        bar = BARS[name]
        passed = value <= bar if name.startswith("max") else value >= bar
        ok &= passed
        print(f"{name}: {value:.3g} (bar {'≤' if name.startswith('max') else '≥'} {bar:g}) "
              f"{'PASS' if passed else 'FAIL'}")
    if args.json:
        print(json.dumps({"rows": table, **result, "pass": ok}))
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
