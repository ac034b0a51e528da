"""The diffusion course's PyTorch code (unit 2), as the numerical and speed reference that the
tests and benchmarks hold jaxdiff against. Needs torch and diffusers (the `test` extra); nothing
in jaxdiff itself imports this module.
"""
from __future__ import annotations

from typing import Optional, Sequence


def course_class_conditioned_unet(num_classes: int = 10, class_emb_size: int = 4):
    """The course's class-conditioned MNIST model (`ClassConditionedUnet`), as written there:
    the label embedding broadcast over the image and concatenated as extra input channels."""
    import torch
    from diffusers import UNet2DModel

    class ClassConditionedUnet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.class_emb = torch.nn.Embedding(num_classes, class_emb_size)
            self.model = UNet2DModel(
                sample_size=28, in_channels=1 + class_emb_size, out_channels=1, layers_per_block=2,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))

        def forward(self, x, t, class_labels):
            bs, ch, w, h = x.shape
            class_cond = self.class_emb(class_labels)
            class_cond = class_cond.view(bs, class_cond.shape[1], 1, 1).expand(bs, class_cond.shape[1], w, h)
            return self.model(torch.cat((x, class_cond), 1), t).sample

    return ClassConditionedUnet()


def course_color_guided_loop(unet, scheduler, x, num_inference_steps: int, *, variant: Optional[str],
                             scale: float, target_color: Sequence[float], weights=None):
    """The course's colour-guidance loop ("Guidance" section) on an NCHW tensor `x`:
    `variant` None (no guidance), "shortcut" (the UNet output held fixed) or "through_model"
    (the gradient through the UNet too). `weights[t]`: an optional per-timestep factor of the
    guidance. Returns the final sample (a detached tensor)."""
    import torch

    def color_loss(images):
        target = torch.tensor(target_color) * 2 - 1  # Map target color to (-1, 1)
        target = target[None, :, None, None]
        return torch.abs(images - target).mean()

    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        if variant is None:
            with torch.no_grad():
                noise_pred = unet(scheduler.scale_model_input(x, t), t)["sample"]
            x = scheduler.step(noise_pred, t, x).prev_sample
            continue
        if variant == "shortcut":
            model_input = scheduler.scale_model_input(x, t)
            with torch.no_grad():
                noise_pred = unet(model_input, t)["sample"]
            x = x.detach().requires_grad_()
        elif variant == "through_model":
            x = x.detach().requires_grad_()
            noise_pred = unet(scheduler.scale_model_input(x, t), t)["sample"]
        else:
            raise ValueError(f"variant {variant!r}; choose one of: None, shortcut, through_model")
        x0 = scheduler.step(noise_pred, t, x).pred_original_sample
        loss = color_loss(x0) * scale
        cond_grad = -torch.autograd.grad(loss, x)[0]
        w = 1.0 if weights is None else float(weights[int(t)])
        x = x.detach() + cond_grad * w
        x = scheduler.step(noise_pred.detach(), t, x).prev_sample
    return x.detach()
