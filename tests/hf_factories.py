"""Tiny Hugging Face vision models built from configs (random weights, nothing
downloaded), usable as `--torch-model hf_factories:NAME` factories.

Each config is small enough to export and prune in seconds; the tests count
the identity-shortcut blocks from these same configs.
"""

from __future__ import annotations

import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileViTConfig,
    MobileViTForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

IMAGE_SIZE = 32
NUM_LABELS = 4


def resnet_config() -> ResNetConfig:
    # The first stage widens 8 -> 16 channels, so its first block has a
    # projection shortcut like every later stage's first block.
    return ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 24], depths=[3, 2],
                        layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
                        num_labels=NUM_LABELS)


def mobilenet_v2_config() -> MobileNetV2Config:
    return MobileNetV2Config(num_channels=3, image_size=IMAGE_SIZE, depth_multiplier=0.25, min_depth=8,
                             depth_divisible_by=8, expand_ratio=2.0, classifier_dropout_prob=0.0,
                             num_labels=NUM_LABELS)


def mobilevit_config() -> MobileViTConfig:
    # Its transformers run on (batch * patch area, patches, channels): 4 rows per image.
    return MobileViTConfig(num_channels=3, image_size=IMAGE_SIZE, hidden_sizes=[16, 24, 32],
                           neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2,
                           classifier_dropout_prob=0.0, num_labels=NUM_LABELS)


def convnext_config() -> ConvNextConfig:
    # layer_scale_init_value 1.0 rather than 1e-6: with random weights the
    # blocks must change their input visibly for the tests to mean anything.
    return ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16], depths=[2, 3],
                          image_size=IMAGE_SIZE, layer_scale_init_value=1.0, drop_path_rate=0.0,
                          num_labels=NUM_LABELS)


def vit_config() -> ViTConfig:
    # A pre-norm transformer: the final LayerNorm after the last layer is not part of it.
    return ViTConfig(image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=3,
                     num_attention_heads=2, intermediate_size=32, num_labels=NUM_LABELS)


def _eval(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval()


def resnet() -> torch.nn.Module:
    return _eval(ResNetForImageClassification(resnet_config()))


def mobilenet_v2() -> torch.nn.Module:
    return _eval(MobileNetV2ForImageClassification(mobilenet_v2_config()))


def mobilevit() -> torch.nn.Module:
    return _eval(MobileViTForImageClassification(mobilevit_config()))


def convnext() -> torch.nn.Module:
    return _eval(ConvNextForImageClassification(convnext_config()))


def vit() -> torch.nn.Module:
    return _eval(ViTForImageClassification(vit_config()))
