"""Victim / marking-network architectures and a uniform view of their last linear layer.

Everything here is a plain ``nn.Module`` built from torchvision constructors. The penultimate features are
read with a forward pre-hook on the named classifier layer, so the same code works for any third-party
model whose final ``nn.Linear`` can be named (``detection.classifier_module``).
"""

from __future__ import annotations

import re

import torchvision
from torch import Tensor, nn

ARCHS: tuple[str, ...] = ("resnet18", "vgg16", "vgg16_bn", "densenet121")

# Dotted name of the final nn.Linear; the small VGG head keeps index 6 so one name serves both variants.
_CLASSIFIER_NAMES = {
    "resnet18": "fc", "vgg16": "classifier.6", "vgg16_bn": "classifier.6", "densenet121": "classifier",
}
_CONFIG_KEYS = "victim.arch / marking.network.arch"

# torchvision's DenseNet checkpoints predate the ban on '.' in module names ('norm.1' -> 'norm1').
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def check_arch(arch: str) -> str:
    """Return ``arch`` if supported, else raise a ValueError listing the choices."""
    if arch not in ARCHS:
        raise ValueError(
            f"unknown architecture {arch!r} (set by {_CONFIG_KEYS}); choices: {', '.join(ARCHS)}"
        )
    return arch


def classifier_name(arch: str) -> str:
    """Dotted module name of ``arch``'s final linear layer (same for both input variants)."""
    return _CLASSIFIER_NAMES[check_arch(arch)]


def _small_conv_stem(out_channels: int = 64) -> nn.Conv2d:
    conv = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _small_vgg_head(num_classes: int) -> nn.Sequential:
    head = nn.Sequential(
        nn.Linear(512, 512),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(512, 512),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(512, num_classes),
    )
    for m in head.modules():
        if isinstance(m, nn.Linear):  # torchvision's VGG init
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return head


def build_model(
    arch: str, num_classes: int, small_input: bool = False, weights: str | None = None
) -> nn.Module:
    """Build ``arch`` with ``num_classes`` outputs.

    ``small_input=True`` gives the 32x32 variant (no early downsampling; small VGG head). ``weights`` is
    ``None`` (random init), ``"imagenet"`` (torch hub cache only) or a local file; tensors whose name and
    shape do not fit are re-initialised (see :func:`radmark.models.weights.load_pretrained_into`).
    """
    check_arch(arch)
    model: nn.Module
    if arch == "resnet18":
        model = torchvision.models.resnet18(num_classes=num_classes)
        if small_input:
            model.conv1 = _small_conv_stem()
            model.maxpool = nn.Identity()
    elif arch in ("vgg16", "vgg16_bn"):
        # vgg16_bn: the same network with BatchNorm after every conv; the plain VGG-16 does not train from
        # scratch on small data in a few epochs (it stays at chance), the BN variant does.
        model = getattr(torchvision.models, arch)(num_classes=num_classes)
        if small_input:
            # The 25088x4096 head is pointless for a 1x1 map at 32 px: pool to 512 and use a 512-wide head.
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = _small_vgg_head(num_classes)
    else:
        model = torchvision.models.densenet121(num_classes=num_classes)
        if small_input:
            features = model.get_submodule("features")
            features.conv0 = _small_conv_stem()
            features.pool0 = nn.Identity()
    if weights is not None:
        from radmark.models.weights import load_pretrained_into  # avoids an import cycle

        load_pretrained_into(model, arch, weights)
    return model


def _guess_classifier_name(model: nn.Module) -> str | None:
    # Only torchvision's own classes are trusted; a third-party model must name its layer.
    if isinstance(model, torchvision.models.ResNet):
        return "fc"
    if isinstance(model, torchvision.models.VGG):
        return "classifier.6"
    if isinstance(model, torchvision.models.DenseNet):
        return "classifier"
    return None


def _resolve_name(model: nn.Module, name: str | None, arch: str | None) -> str:
    if name is not None:
        return name
    if arch is not None:
        return classifier_name(arch)
    guessed = _guess_classifier_name(model)
    if guessed is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"cannot tell which layer of {type(model).__name__} is the classifier; pass its dotted name "
            f"(detection.classifier_module). nn.Linear modules found: {linears or 'none'}"
        )
    return guessed


def get_classifier(model: nn.Module, name: str | None = None, arch: str | None = None) -> nn.Linear:
    """The final linear layer, by dotted ``name``, else by ``arch``, else by torchvision model type."""
    name = _resolve_name(model, name, arch)
    try:
        layer = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"{type(model).__name__} has no submodule {name!r} (classifier name)") from e
    if not isinstance(layer, nn.Linear):
        raise ValueError(
            f"classifier {name!r} of {type(model).__name__} is a {type(layer).__name__}, not an nn.Linear"
        )
    return layer


def feature_dim(model: nn.Module, name: str | None = None, arch: str | None = None) -> int:
    """Size d of the penultimate features (the classifier's ``in_features``)."""
    return get_classifier(model, name, arch).in_features


def penultimate_features(
    model: nn.Module, x: Tensor, classifier: str | None = None, arch: str | None = None
) -> Tensor:
    """Input of the classifier layer for batch ``x``, shape (n, d); gradients flow back to ``x``.

    Runs the whole forward pass, so put the model in eval mode first (train mode updates BN statistics).
    """
    layer = get_classifier(model, classifier, arch)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        captured.append(inputs[0])

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"classifier layer was called {len(captured)} times in one forward pass, expected 1"
        )
    return captured[0]


class FeatureExtractor(nn.Module):
    """``model`` seen as x -> penultimate features (n, d); differentiable w.r.t. the input."""

    def __init__(self, model: nn.Module, classifier: str | None = None, arch: str | None = None):
        super().__init__()
        self.model = model
        self.classifier = _resolve_name(model, classifier, arch)
        self.dim = feature_dim(model, self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        return penultimate_features(self.model, x, self.classifier)


def infer_small_input(arch: str, state_dict: dict[str, Tensor]) -> bool:
    """Whether a state_dict of ``arch`` is the 32x32 variant, read from the stem (or VGG head) shape."""
    check_arch(arch)
    key = {
        "resnet18": "conv1.weight",
        "densenet121": "features.conv0.weight",
        "vgg16": "classifier.0.weight",
        "vgg16_bn": "classifier.0.weight",
    }[arch]
    if key not in state_dict:
        raise KeyError(f"state_dict has no {key!r}: it does not look like a {arch}")
    shape = tuple(state_dict[key].shape)
    if arch.startswith("vgg16"):
        return shape[1] == 512  # small head: Linear(512, 512); standard: Linear(25088, 4096)
    return shape[-1] == 3  # 3x3 stem vs torchvision's 7x7


def infer_num_classes(arch: str, state_dict: dict[str, Tensor]) -> int:
    """Number of classes from the classifier weight's shape."""
    key = classifier_name(arch) + ".weight"
    if key not in state_dict:
        raise KeyError(f"state_dict has no {key!r}: it does not look like a {arch}")
    return int(state_dict[key].shape[0])


def fix_legacy_keys(arch: str, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename old-style DenseNet keys; other archs are returned unchanged."""
    if arch != "densenet121":
        return state_dict
    out = {}
    for key, value in state_dict.items():
        m = _DENSENET_OLD_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out
