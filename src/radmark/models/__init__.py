"""Architectures, classifier/feature access, pretrained weights and radmark's plain checkpoint format."""

from radmark.models.architectures import (
    ARCHS,
    FeatureExtractor,
    build_model,
    check_arch,
    classifier_name,
    feature_dim,
    fix_legacy_keys,
    get_classifier,
    infer_num_classes,
    infer_small_input,
    penultimate_features,
)
from radmark.models.checkpoint import load_checkpoint, meta_path, read_meta, read_state_dict, save_checkpoint
from radmark.models.weights import (
    imagenet_weights_path,
    imagenet_weights_url,
    load_matching,
    load_pretrained,
    load_pretrained_into,
)

__all__ = [
    "ARCHS",
    "FeatureExtractor",
    "build_model",
    "check_arch",
    "classifier_name",
    "feature_dim",
    "fix_legacy_keys",
    "get_classifier",
    "imagenet_weights_path",
    "imagenet_weights_url",
    "infer_num_classes",
    "infer_small_input",
    "load_checkpoint",
    "load_matching",
    "load_pretrained",
    "load_pretrained_into",
    "meta_path",
    "penultimate_features",
    "read_meta",
    "read_state_dict",
    "save_checkpoint",
]
