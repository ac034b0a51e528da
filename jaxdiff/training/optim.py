"""The optimizer of SD fine-tuning: AdamW after global-norm clipping, with a warm-up and a
constant, linear or cosine learning-rate schedule."""
from __future__ import annotations

from typing import Optional

import optax

from jaxdiff.errors import JaxdiffError, unknown_choice

LR_SCHEDULES = ("constant", "linear", "cosine")


def make_optimizer(learning_rate: float, *, total_steps: int, warmup_steps: int = 0,
                   schedule: str = "constant", weight_decay: float = 1e-2, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, max_grad_norm: Optional[float] = 1.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (diffusers' defaults: β=(0.9, 0.999), ε=1e-8, weight decay 1e-2 on every parameter)
    after clipping the global gradient norm to `max_grad_norm` (None = no clipping), with a
    learning rate that rises linearly from 0 over `warmup_steps`, then stays (`constant`) or
    decays to 0 at `total_steps` (`linear`, `cosine`). Returns (tx, schedule)."""
    if schedule not in LR_SCHEDULES:
        raise unknown_choice("learning-rate schedule", schedule, LR_SCHEDULES)
    if not learning_rate > 0:
        raise JaxdiffError(f"learning rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise JaxdiffError(f"warm-up steps must be >= 0, got {warmup_steps}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise JaxdiffError(f"max grad norm must be > 0, got {max_grad_norm}")
    decay_steps = max(1, total_steps - warmup_steps)
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    elif schedule == "linear":
        after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(learning_rate, decay_steps)
    if warmup_steps > 0:
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after],
                                  [warmup_steps])
    else:
        lr = after
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts), lr
