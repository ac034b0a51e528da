"""Training: the state and the pure train step (`state`), the one denoising loss (`losses`) and
its Stable Diffusion adapter (`text_to_image`), the optimizer (`optim`), orbax checkpoints
(`checkpoint`), the step loop (`loop`), stop requests (`preemption`), the run log (`run_log`),
the run folder (`run_folder`), and the skeleton every training program shares (`program`) with
the programs' configs (`configs`).

The names most programs need are importable from here directly.
"""
from jaxdiff.training.checkpoint import (Checkpointer, CheckpointMismatch, fingerprint,
                                         read_checkpoint_meta, resume_everywhere, state_fingerprints)
from jaxdiff.training.losses import denoising_loss, diffusion_loss, min_snr_weights, snr
from jaxdiff.training.state import EMA, TrainState, create_train_state, ema_update, make_train_step

__all__ = [
    "Checkpointer", "CheckpointMismatch", "fingerprint", "read_checkpoint_meta", "resume_everywhere",
    "state_fingerprints", "denoising_loss", "diffusion_loss", "min_snr_weights", "snr", "EMA", "TrainState",
    "create_train_state", "ema_update", "make_train_step",
]
