"""Training: the state and the pure train step (`state`), the denoising losses (`losses`,
`text_to_image`), the optimizer (`optim`), orbax checkpoints (`checkpoint`), the step loop
(`loop`), stop requests (`preemption`) and the run log (`run_log`).

The names most programs need are importable from here directly.
"""
from jaxdiff.training.checkpoint import (Checkpointer, CheckpointMismatch, fingerprint,
                                         read_checkpoint_meta, resume_everywhere, state_fingerprints)
from jaxdiff.training.losses import diffusion_loss, min_snr_weights, snr
from jaxdiff.training.state import EMA, TrainState, create_train_state, ema_update, make_train_step

__all__ = [
    "Checkpointer", "CheckpointMismatch", "fingerprint", "read_checkpoint_meta", "resume_everywhere",
    "state_fingerprints", "diffusion_loss", "min_snr_weights", "snr", "EMA", "TrainState",
    "create_train_state", "ema_update", "make_train_step",
]
