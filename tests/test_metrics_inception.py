"""The ADM Inception path through torch-fidelity, offline, with a randomly initialised local weights file.

The weights file (~96 MB) is made at test time in a temporary folder: torchvision's InceptionV3 has the same
state-dict layout as torch-fidelity's ``inception-v3-compat``; a variance-preserving (Kaiming) init keeps the
features non-degenerate through the 40-odd layers (PyTorch's default init shrinks them towards a constant).
"""

import argparse
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
import torchvision

from ccalign.config import load_config
from ccalign.io import sha256_file
from ccalign.metrics.features import SPATIAL_MODULE, extract, inception
from ccalign.metrics.fidelity import feature_stats
from ccalign.stages import evaluate as evaluate_stage

ROOT = Path(__file__).resolve().parents[1]
N = 6  # images per set: a forward pass costs ~0.2 s per image on a CPU


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
            nn.init.zeros_(m.bias)
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Smooth random colour images (N, 32, 32, 3) uint8."""
    g = torch.Generator().manual_seed(0)
    small = torch.rand(N, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def features(weights, images, tmp_path_factory, monkeypatch_module) -> dict[str, np.ndarray]:
    """Features of ``images``, extracted with every download path disabled and an empty TORCH_HOME."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    monkeypatch_module.setenv("TORCH_HOME", str(torch_home))

    def no_download(*args, **kwargs):
        raise AssertionError("evaluation tried to download weights")

    monkeypatch_module.setattr(tf_inception, "load_state_dict_from_url", no_download)
    feats = extract(inception(weights), [images[:4], images[4:]], N, "cpu")
    assert not any(torch_home.iterdir())
    return feats


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_feature_shapes_and_non_degenerate_values(features):
    assert features["pool"].shape == (N, 2048)
    assert features["logits"].shape == (N, 1008)
    assert features["spatial"].shape == (N, 17 * 17 * 7)
    assert features["spatial"].min() >= 0  # the ReLU output of conv + batchnorm, as TF's mixed_6/conv:0
    for v in features.values():
        assert np.isfinite(v).all() and v.std(axis=0).mean() > 1e-3  # images differ in feature space


def test_spatial_features_are_mixed_6d_branch1x1_in_tf_order(weights, images, features):
    model = inception(weights)
    net = model.net
    block_input = {}
    net.Mixed_6d.register_forward_pre_hook(lambda m, args: block_input.setdefault("x", args[0]))
    out = model(torch.from_numpy(images[:2]).permute(0, 3, 1, 2))
    assert net.get_submodule(SPATIAL_MODULE) is net.Mixed_6d.branch1x1
    conv = net.Mixed_6d.branch1x1(block_input["x"])  # (2, 192, 17, 17)
    assert conv.shape == (2, 192, 17, 17)
    spatial = out["spatial"].reshape(2, 17, 17, 7)  # TF flattens NHWC: index (h * 17 + w) * 7 + c
    torch.testing.assert_close(spatial, conv[:, :7].permute(0, 2, 3, 1))
    np.testing.assert_allclose(out["spatial"].numpy(), features["spatial"][:2], rtol=1e-5, atol=1e-6)
    # logits are pool @ fc.weight.T without the bias: TF softmax/logits/MatMul, ADM's IS input
    torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.T)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_stage(tmp_path: Path, weights: Path, samples: Path, reference: Path) -> dict:
    cfg = load_config(ROOT / "config" / "config.yaml", [f"data_root={tmp_path}"])
    cfg["tracking"]["uri"] = f"http://127.0.0.1:{_closed_port()}"
    cfg["evaluate"] |= {"batch_size": 4, "device": "cpu", "is_split_size": 2, "prc_k": 3}
    out = tmp_path / "metrics.json"
    args = argparse.Namespace(
        samples=samples, reference=reference, extractor="inception", inception_weights=weights,
        classifier=None, out=out, labels={},
    )  # fmt: skip
    evaluate_stage.main(cfg, args)
    return json.loads(out.read_text())


def test_evaluate_stage_with_stored_reference_statistics(weights, images, features, tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images, labels=np.arange(N))
    mu, sigma = feature_stats(features["pool"])
    mu_s, sigma_s = feature_stats(features["spatial"])
    reference = tmp_path / "VIRTUAL_ref.npz"  # the same images; statistics shifted by a known offset
    np.savez(reference, arr_0=images, mu=mu + 1.0, sigma=sigma, mu_s=mu_s + 0.5, sigma_s=sigma_s)
    record = _run_stage(tmp_path, weights, samples, reference)
    m = record["metrics"]
    assert set(m) == {"fid", "sfid", "is", "is_std", "precision", "recall"}  # no class accuracy for Inception
    # equal covariances: FID = |mu - mu_ref|^2, so the stored statistics (not arr_0's) were used
    assert m["fid"] == pytest.approx(2048 * 1.0**2, abs=1e-2)
    assert m["sfid"] == pytest.approx(2023 * 0.5**2, abs=1e-2)
    assert m["precision"] == m["recall"] == 1.0  # from the reference's arr_0: the same images
    assert m["is"] > 1.0
    assert record["n"] == N and record["extractor"] == "inception"
    assert record["samples_sha256"] == sha256_file(samples)
    assert record["reference_sha256"] == sha256_file(reference)
    pending = list((tmp_path / "mlflow" / "pending").glob("*.json"))
    assert len(pending) == 1 and '"sfid"' in pending[0].read_text()


def test_weights_file_that_is_not_an_inception_state_dict(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not an inception-v3-compat state dict"):
        inception(path)
