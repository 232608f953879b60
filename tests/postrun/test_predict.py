"""Predictions from a finished run (`dtrain.load`, `dtrain predict`): the run folder alone gives
the model its preprocessing back, so raw held-out inputs reproduce the run's own evaluation."""

import numpy as np
import pytest
import torch
from helpers import CNN, LM, ROOT, TINY_CNN, TINY_LM, check, run_dtrain

import dtrain
from dtrain.config import ConfigError
from dtrain.data import images


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "run"
    check(run_dtrain(["train", CNN, *TINY_CNN, "train.max_steps=30", f"output_dir={out}"], cwd=out.parent))
    return out


def test_raw_images_give_the_runs_own_held_out_accuracy(cnn_run):
    """The digits as scikit-learn gives them (scaled to [0, 1]) through `dtrain.load`: the
    accuracy is the run's eval accuracy, because the training split's statistics travel with
    the run. Without them (mean 0, std 1: raw pixels) the same model scores otherwise."""
    import json

    predictor = dtrain.load(cnn_run)
    _, _, x, y = images._digits_split(predictor.cfg.data.val_fraction)
    probs = predictor(x)
    assert probs.shape == (len(y), 10) and torch.allclose(probs.sum(1), torch.ones(len(y)), atol=1e-5)
    accuracy = float((probs.argmax(1) == torch.as_tensor(y)).double().mean())
    summary = json.loads((cnn_run / "summary.json").read_text())
    assert accuracy == pytest.approx(summary["eval"]["accuracy"], abs=1e-9)
    predictor.task.mean, predictor.task.std = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)  # forgotten preprocessing
    unnormalised = float((predictor(x).argmax(1) == torch.as_tensor(y)).double().mean())
    assert abs(unnormalised - accuracy) > 0.02, (unnormalised, accuracy)


def test_a_run_trained_from_a_folder_predicts_once_the_folder_is_gone(tmp_path):
    """The run folder is enough: the training data's folder (`data.path`) moved away, the run
    still loads and predicts (its config was validated against the data, and refused)."""
    from helpers import write_image_folder

    folder = write_image_folder(tmp_path / "images", classes=2, per_class=20, size=12)
    out = tmp_path / "run"
    check(run_dtrain(["train", CNN, *TINY_CNN, "train.max_steps=2", f"data.path={folder}", "model.image_size=12",
                      "data.global_batch_size=16", f"output_dir={out}"], cwd=tmp_path))  # fmt: skip
    folder.rename(tmp_path / "elsewhere")
    probabilities = dtrain.load(out)(torch.rand(3, 3, 12, 12))  # (N, C, H, W) in [0, 1]
    assert probabilities.shape == (3, 2)


def test_predict_writes_the_same_probabilities_and_refuses_bad_input_in_one_line(cnn_run, tmp_path):
    _, _, x, _ = images._digits_split(0.2)
    np.save(tmp_path / "digits.npy", x[:50])
    proc = check(
        run_dtrain(
            [
                "predict",
                str(cnn_run),
                str(tmp_path / "digits.npy"),
                "--output",
                str(tmp_path / "probs.npy"),
                "--batch-size",
                "16",
            ],
            cwd=tmp_path,
        )
    )
    assert proc.stdout.strip() == f"predict: 50 inputs [1, 8, 8] -> {tmp_path / 'probs.npy'} [50, 10] (cnn)"
    assert np.allclose(np.load(tmp_path / "probs.npy"), dtrain.load(cnn_run)(x[:50]).numpy(), atol=1e-6)

    np.save(tmp_path / "wrong.npy", np.zeros((4, 3, 5), dtype=np.float32))  # not (N, 1, 8, 8)
    bad = run_dtrain(
        ["predict", str(cnn_run), str(tmp_path / "wrong.npy"), "--output", str(tmp_path / "o.npy")], cwd=tmp_path
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "inputs=" in bad.stderr and "float32[4, 3, 5]" in bad.stderr and "the model cannot take these" in bad.stderr
    assert not (tmp_path / "o.npy").exists()
    with pytest.raises(ConfigError, match="has no config.yaml: give the output_dir of a finished dtrain run"):
        dtrain.load(tmp_path)


def test_the_transformer_predicts_what_dtrain_sample_generates(tmp_path):
    """Greedy decoding with `predict`'s next-character probabilities is `dtrain sample --top-k 1`."""
    out = tmp_path / "lm"
    check(run_dtrain(["train", LM, *TINY_LM, f"output_dir={out}"], cwd=tmp_path))
    predictor = dtrain.load(out)
    text = "def "
    for _ in range(20):
        text += predictor.task.vocab.decode([int(predictor(text)[0, -1].argmax())])
    sampled = check(
        run_dtrain(["sample", str(out), "--prompt", "def ", "--tokens", "20", "--top-k", "1"], cwd=tmp_path)
    )
    assert sampled.stdout.rstrip("\n") == text


@pytest.mark.slow
def test_the_gan_predicts_samples_of_its_generator(tmp_path):
    out = tmp_path / "gan"
    check(
        run_dtrain(
            [
                "train",
                str(ROOT / "recipes" / "gan_digits.yaml"),
                "train.max_steps=4",
                "tracking.enabled=false",
                "train.eval_every_steps=0",
                "checkpoint.every_steps=0",
                f"output_dir={out}",
            ],
            cwd=tmp_path,
        )
    )
    predictor = dtrain.load(out)
    images = predictor(16)
    assert images.shape == (16, 1, 8, 8) and images.abs().max() <= 1
    z = torch.randn(3, predictor.cfg.model.z_dim)
    assert torch.equal(predictor(z), predictor(z))  # eval mode: no batch statistics, no dropout
