"""Architectures, classifier/feature access, pretrained loading and the plain checkpoint format."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torchvision
from torch import nn

from radmark.models import (
    ARCHS,
    FeatureExtractor,
    build_model,
    classifier_name,
    feature_dim,
    get_classifier,
    imagenet_weights_path,
    infer_small_input,
    load_checkpoint,
    load_pretrained,
    penultimate_features,
    save_checkpoint,
)

FEATURE_DIMS = {
    ("resnet18", False): 512,
    ("vgg16", False): 4096,
    ("vgg16_bn", False): 4096,
    ("densenet121", False): 1024,
    ("resnet18", True): 512,
    ("vgg16", True): 512,
    ("vgg16_bn", True): 512,
    ("densenet121", True): 1024,
}

_CACHE: dict[tuple[str, bool], nn.Module] = {}


def model_for(arch: str, small: bool) -> nn.Module:
    # Built once per session: VGG-16 alone takes ~1-2 s to initialise.
    if (arch, small) not in _CACHE:
        torch.manual_seed(0)
        _CACHE[arch, small] = build_model(arch, 10, small_input=small).eval()
    return _CACHE[arch, small]


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_32px(arch, small):
    model = model_for(arch, small)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = penultimate_features(model, x, arch=arch)
    d = FEATURE_DIMS[arch, small]
    assert logits.shape == (2, 10)
    assert feats.shape == (2, d)
    assert feature_dim(model, arch=arch) == d
    clf = get_classifier(model, arch=arch)
    assert isinstance(clf, nn.Linear) and clf.weight.shape == (10, d)
    # Without arch the torchvision model type is enough, and the name is the same for both variants.
    assert get_classifier(model) is model.get_submodule(classifier_name(arch))
    # The features really are the classifier's input.
    torch.testing.assert_close(clf(feats), logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_224px_standard(arch):
    model = model_for(arch, False)
    with torch.no_grad():
        feats = penultimate_features(model, torch.randn(1, 3, 224, 224), arch=arch)
    assert feats.shape == (1, FEATURE_DIMS[arch, False])


def test_small_variants_change_the_stem():
    r = model_for("resnet18", True)
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1) and isinstance(r.maxpool, nn.Identity)
    d = model_for("densenet121", True)
    assert d.features.conv0.kernel_size == (3, 3) and isinstance(d.features.pool0, nn.Identity)
    v = model_for("vgg16", True)
    assert [m.in_features for m in v.classifier if isinstance(m, nn.Linear)] == [512, 512, 512]
    assert classifier_name("vgg16") == "classifier.6"
    # Standard variants are torchvision's exactly.
    std = model_for("resnet18", False)
    assert std.conv1.kernel_size == (7, 7) and isinstance(std.maxpool, nn.MaxPool2d)


def test_unknown_arch():
    with pytest.raises(ValueError, match="victim.arch.*resnet18, vgg16, vgg16_bn, densenet121"):
        build_model("alexnet", 10)


def test_penultimate_matches_manual_resnet18():
    model = model_for("resnet18", False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
        manual = torch.flatten(model.avgpool(h), 1)
        torch.testing.assert_close(penultimate_features(model, x), manual)
    assert not model.fc._forward_pre_hooks  # the hook does not outlive the call


def test_feature_extractor_differentiable():
    fx = FeatureExtractor(model_for("resnet18", True), arch="resnet18")
    assert fx.dim == 512 and fx.classifier == "fc"
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    fx(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_third_party_model_needs_a_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU())
            self.head = nn.Linear(7, 3)

        def forward(self, x):
            return self.head(self.body(x))

    net = Net()
    with pytest.raises(ValueError, match="classifier_module"):
        get_classifier(net)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        get_classifier(net, "body")
    x = torch.randn(4, 3, 2, 2)
    feats = penultimate_features(net, x, "head")
    torch.testing.assert_close(feats, net.body(x))
    assert feature_dim(net, "head") == 7


def test_checkpoint_roundtrip_readable_without_radmark(tmp_path):
    model = model_for("resnet18", False)
    path = save_checkpoint(
        model,
        tmp_path / "victim.pt",
        {"arch": "resnet18", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
    )
    meta = json.loads((tmp_path / "victim.json").read_text())
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 10 and meta["small_input"] is False
    assert meta["classifier"] == "fc" and meta["image_size"] == 32
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]

    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
        reloaded, meta2 = load_checkpoint(path)
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    assert meta2["mean"] == [0.5] * 3

    with pytest.raises(ValueError, match="has 10 classes but the caller expects 100"):
        load_checkpoint(path, num_classes=100)
    with pytest.raises(ValueError, match="is a resnet18"):
        load_checkpoint(path, arch="vgg16")


def test_load_plain_state_dict_infers_shape(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(model_for("resnet18", True).state_dict(), path)
    with pytest.raises(ValueError, match="pass arch"):
        load_checkpoint(path)
    model, meta = load_checkpoint(path, arch="resnet18")
    assert meta["num_classes"] == 10 and meta["small_input"] is True
    assert model.fc.out_features == 10 and model.conv1.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="small_input"):
        load_checkpoint(path, arch="resnet18", small_input=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_infer_small_input(arch):
    for small in (False, True):
        assert infer_small_input(arch, model_for(arch, small).state_dict()) is small


def test_imagenet_weights_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("RADMARK_ALLOW_DOWNLOAD", raising=False)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet18") == expected
    with pytest.raises(FileNotFoundError) as err:
        build_model("resnet18", 10, weights="imagenet")
    msg = str(err.value)
    assert str(expected) in msg and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg


def test_imagenet_weights_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    src = torchvision.models.resnet18()
    torch.save(src.state_dict(), path)
    model, skipped = load_pretrained("resnet18", "imagenet", num_classes=10, small_input=True)
    assert sorted(skipped) == ["conv1.weight", "fc.bias", "fc.weight"]
    torch.testing.assert_close(model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)


def test_pretrained_local_file_skips_head(tmp_path, caplog):
    src = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "r18_1000.pt"
    torch.save(src.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="radmark.models.weights"):
        model, skipped = load_pretrained("resnet18", str(path), num_classes=10)
    assert sorted(skipped) == ["fc.bias", "fc.weight"]
    assert "re-initialised" in caplog.text
    torch.testing.assert_close(model.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    torch.testing.assert_close(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 10

    with pytest.raises(FileNotFoundError, match="missing.pt.*victim.init"):
        load_pretrained("resnet18", str(tmp_path / "missing.pt"), config_key="victim.init")


def test_densenet_legacy_keys_are_renamed(tmp_path):
    src = model_for("densenet121", True)
    # torchvision's published DenseNet files use 'norm.1' where the module is now 'norm1'.
    legacy = {
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in src.state_dict().items()
    }
    path = tmp_path / "dn.pt"
    torch.save(legacy, path)
    model, skipped = load_pretrained("densenet121", str(path), num_classes=10, small_input=True)
    assert skipped == []
    torch.testing.assert_close(
        model.features.denseblock1.denselayer1.conv2.weight, src.features.denseblock1.denselayer1.conv2.weight
    )


def test_save_checkpoint_rejects_contradicting_meta(tmp_path):
    with pytest.raises(ValueError, match="num_classes=100"):
        save_checkpoint(
            model_for("resnet18", True), tmp_path / "x.pt", {"arch": "resnet18", "num_classes": 100}
        )
