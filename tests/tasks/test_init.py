"""`model.init` against the formulas, and the CNN's zero-initialised residual branches and
class-prior bias."""

import math

import pytest
import torch
import torch.nn as nn
from helpers import CNN

from dtrain.config import ConfigError
from dtrain.tasks.cnn import BasicBlock, CNNTask
from dtrain.tasks.initialization import initialize
from dtrain.train.config import load_config


def layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1000, 500), nn.Conv2d(64, 128, 3))


def test_kaiming_std_is_sqrt_2_over_fan_in_and_biases_are_zero():
    model = layers()
    initialize(model, "kaiming")
    for m, fan_in in ((model[0], 1000), (model[1], 64 * 9)):
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
        assert m.bias.abs().max().item() == 0


def test_xavier_is_uniform_within_sqrt_6_over_fan_in_plus_fan_out():
    model = layers()
    initialize(model, "xavier")
    for m, fan_in, fan_out in ((model[0], 1000, 500), (model[1], 64 * 9, 128 * 9)):
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = m.weight.detach()
        assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # the uniform's std


def test_default_leaves_the_tasks_own_init():
    model = layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initialize(model, "default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def cnn_model(*overrides: str) -> tuple[CNNTask, nn.Module]:
    task = CNNTask(load_config(CNN, list(overrides)))
    task.datasets()
    torch.manual_seed(0)
    return task, task.models()["model"].module


def test_cnn_zero_init_residual_and_prior_bias():
    task, model = cnn_model("model.init=kaiming", "model.prior_bias=true")
    bn2 = [m.bn2.weight for m in model.modules() if isinstance(m, BasicBlock)]
    assert bn2 and all(w.abs().max().item() == 0 for w in bn2)  # every block starts as the identity
    prior = task.class_counts / task.class_counts.sum()
    assert torch.allclose(torch.softmax(model.fc.bias, 0), prior.float(), atol=1e-6)
    _, plain = cnn_model("model.zero_init_residual=false")
    assert all((m.bn2.weight == 1).all() for m in plain.modules() if isinstance(m, BasicBlock))
    assert plain.fc.bias.abs().max().item() < 1  # PyTorch's own uniform init, not the prior


def test_the_gan_refuses_another_scheme():
    with pytest.raises(ConfigError, match=r"^model.init='kaiming': the GAN initialises its networks itself"):
        load_config(CNN.replace("cnn_digits", "gan_ring"), ["model.init=kaiming"])


def test_regularisation_keys_reach_the_model_and_the_loss():
    _, model = cnn_model("model.dropout=0.3")
    assert model.drop.p == 0.3
    from dtrain.tasks.transformer import TransformerTask

    losses = []
    for smoothing in (0.0, 0.1):
        task = TransformerTask(
            load_config(
                CNN.replace("cnn_digits", "transformer_charlm"),
                ["data.max_chars=20000", "model.n_layer=1", f"model.label_smoothing={smoothing}"],
            )
        )
        train, _ = task.datasets()
        torch.manual_seed(0)
        model = task.build_model().eval()
        x, y = train[0]
        losses.append(task.loss(model, (x[None], y[None])).item())
    assert losses[1] != pytest.approx(losses[0], abs=1e-3)  # smoothing changes the training loss
