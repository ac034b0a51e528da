"""The course's class-conditioned MNIST model: parity with the course's PyTorch
`ClassConditionedUnet`, the UNet's class embedding, and the digit classifier that judges samples.
The train and sample programs: test_program_mnist.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.class_conditioned import ClassConditionedUnet
from jaxdiff.weights import torch_state_to_flax


# ------------------------------------------------------------------------------------------------
# The model against the course's PyTorch code
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("null_class", [False, True])
def test_matches_the_course_pytorch_model_with_the_same_weights(null_class):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    from jaxdiff.testing.reference import course_class_conditioned_unet

    reference = course_class_conditioned_unet(num_classes=10 + int(null_class)).eval()
    with torch.no_grad():  # non-zero everywhere, so every weight matters
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = ClassConditionedUnet.create(null_class=null_class)
    params = torch_state_to_flax(((k, v.numpy()) for k, v in reference.state_dict().items()),
                                 model.param_template(),
                                 source="course ClassConditionedUnet")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    t = np.array([999, 500, 3])
    labels = np.array([0, 7, 10 if null_class else 9])
    with torch.no_grad():
        expected = reference(torch.tensor(x), torch.tensor(t), torch.tensor(labels)).numpy()
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), t, labels)
    # float32 through ~30 conv/attention layers; outputs are O(1).
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4)


def test_unet_class_embedding_conditions_every_block_and_concat_is_optional():
    tiny = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    model = ClassConditionedUnet.create(class_emb_size=0, null_class=True, unet_class_embedding=True, **tiny)
    assert model.config.unet.num_class_embeds == 11 and model.config.unet.in_channels == 1
    params = model.init_weights(jax.random.PRNGKey(0))
    assert "class_emb" not in params and params["model"]["class_embedding"]["embedding"].shape == (11, 32)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 1))
    apply = jax.jit(model.apply)
    a = apply({"params": params}, x, jnp.array([5, 5]), jnp.array([1, 10]))
    b = apply({"params": params}, x, jnp.array([5, 5]), jnp.array([2, 10]))
    assert not np.allclose(a[0], b[0]) and np.allclose(a[1], b[1])


# ------------------------------------------------------------------------------------------------
# The digit classifier (the judge of test_program_mnist's quality bar)
# ------------------------------------------------------------------------------------------------

def test_digit_classifier_reads_digits_after_a_short_training(mnist_dir):
    from jaxdiff.data.mnist import load_idx_folder
    from jaxdiff.eval.digit_classifier import train_classifier

    _, holdout_accuracy = train_classifier(load_idx_folder(mnist_dir), steps=120)
    assert holdout_accuracy > 0.85  # ~0.9 after 120 steps; the full 1000 steps reach ~0.99
