"""The model factory: `create_model(config.model)` builds a retrieval model by name:

    global  GLR2020: backbone -> pooling of the 'final' map -> neck  (GlobalModel)
    dolg    GLR2021 / DOLG paper: local + global branches, orthogonal fusion (DOLG)

Both take raw pixels [B, H, W, 3] in 0..255 and return a [B, embedding_dim]
float32 embedding that is not L2-normalised. Call them as
`model.apply(variables, images, train=..., mutable=['batch_stats'])` in
training, plus rngs={'dropout': key} when dropout > 0 or the backbone
has stochastic depth (EfficientNet's drop_connect_rate). The backbone's
variables live under `params['backbone']` / `batch_stats['backbone']`.

Model config keys (`default_model_config(name)` gives every key and default):

    name           'global' | 'dolg'
    backbone       a backbone registry name (efficientnet_b0..b7, resnet50, ...)
    embedding_dim  output size (512)
    pooling        'gap' | 'gem': pools the 'final' map (global) or the
                   stride-32 map in DOLG's global branch
    neck           'dense_swish' | 'dense_bn_prelu' | 'dense'
    dropout        rate on the pooled descriptor in training
    descriptor     what retrieval and recognition search with: 'embedding'
                   (the neck's output, both recipes) | 'pooled' (the pooled
                   features before the neck, sown as intermediates/pooled;
                   the head still trains on the embedding)
    dtype          'float32' | 'bfloat16' compute dtype (params stay float32)
    dolg           dilations, branch_channels, local_dim, global_dim,
                   image_pooling, global_branch (used by 'dolg' only)

The input convention of the weights, and how the model trains:

    input_normalization  a preset of input_normalization.INPUT_NORMALIZATIONS
                   ('imagenet', 'caffe', ...): the per-channel affine the
                   backbone applies to raw pixels; None: 'imagenet'
    padding        EfficientNet stride-2 padding, 'same' | 'keras_dynamic'
                   (they differ at sizes that are not multiples of 32);
                   None: 'same'. Must stay None for a ResNet.
    drop_connect_rate  EfficientNet stochastic depth of the last block;
                   None: the variant's (0.2 for B0-B7). 0 for a ResNet.
    batch_norm     'batch' | 'frozen': every BatchNorm of the model uses the
                   batch's statistics in training, or its moving statistics
                   (gamma/beta still train; layers.BATCH_NORM_MODES)
    conv_lowering  'auto' | 'xla' | 'im2col': how the backbone's convolutions
                   reach the compiler (conv_lowering.py); the same weights
                   and results either way. 'auto': im2col + matmul on a CPU
                   (2.3x the demo's training rate there; depthwise
                   convolutions stay XLA's, 'im2col' lowers them too: 2-6x
                   an EfficientNet's rate), XLA's convolution on TPUs and
                   GPUs
    remat          'none' | 'blocks': each backbone block recomputed in the
                   backward pass, keeping only its input (layers.REMAT_MODES);
                   the same weights and gradients, less activation memory
                   for about one more forward pass of compute

`resolve_model_config` replaces each None by the value it stands for, so a
resolved config (what a run writes to its config.json, see run_config.py)
rebuilds exactly the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from landmark_jax.models import (
    backbones,
    conv_lowering,
    dolg,
    efficientnet,
    global_model,
    input_normalization,
    layers,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_DOLG_DEFAULTS: dict[str, Any] = {
    "dilations": (6, 12, 18),  # Henkel's B5 run and the official code; B6/B7 used (3, 6, 9)
    "branch_channels": 512,
    "local_dim": 1024,
    "global_dim": 1024,
    "image_pooling": False,
    "global_branch": "gem_fc",
}

# Options of the backbone and of training behaviour, the same for every model.
# None stands for the backbone's own default (see the module docstring); the
# types let a command line set a key whose default is None.
_BACKBONE_OPTIONS: dict[str, tuple[Any, type]] = {
    "input_normalization": (None, str),
    "padding": (None, str),
    "drop_connect_rate": (None, float),
    "batch_norm": ("batch", str),
    "conv_lowering": ("auto", str),
    "remat": ("none", str),
}

# Defaults follow the published recipes: GLR2020 1st place (EfficientNet-B7,
# GAP, Dense+swish) and GLR2021 1st place (DOLG on EfficientNet-B5, GeM,
# Dense+BN+PReLU).
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "global": {
        "backbone": "efficientnet_b7",
        "embedding_dim": 512,
        "pooling": "gap",
        "neck": "dense_swish",
        "dropout": 0.0,
        "descriptor": "embedding",
        "dtype": "float32",
    },
    "dolg": {
        "backbone": "efficientnet_b5",
        "embedding_dim": 512,
        "pooling": "gem",
        "neck": "dense_bn_prelu",
        "dropout": 0.0,
        "descriptor": "embedding",
        "dtype": "float32",
    },
}


def _build_global(cfg: Mapping[str, Any], backbone: nn.Module, dtype: Any) -> nn.Module:
    return global_model.GlobalModel(
        backbone=backbone,
        embedding_dim=cfg["embedding_dim"],
        pooling=cfg["pooling"],
        neck=cfg["neck"],
        dropout=cfg["dropout"],
        dtype=dtype,
        batch_norm=cfg["batch_norm"],
    )


def _build_dolg(cfg: Mapping[str, Any], backbone: nn.Module, dtype: Any) -> nn.Module:
    d = cfg["dolg"]
    return dolg.DOLG(
        backbone=backbone,
        embedding_dim=cfg["embedding_dim"],
        local_dim=d["local_dim"],
        global_dim=d["global_dim"],
        dilations=tuple(d["dilations"]),
        branch_channels=d["branch_channels"],
        image_pooling=d["image_pooling"],
        global_branch=d["global_branch"],
        pooling=cfg["pooling"],
        neck=cfg["neck"],
        dropout=cfg["dropout"],
        dtype=dtype,
        batch_norm=cfg["batch_norm"],
    )


# What extraction returns for an image (retrieval/extract.py).
DESCRIPTORS = ("embedding", "pooled")

MODELS: dict[str, Callable[[Mapping[str, Any], nn.Module, Any], nn.Module]] = {
    "global": _build_global,
    "dolg": _build_dolg,
}


def _check_name(name: Any) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; valid: {sorted(MODELS)}")
    return name


def default_model_config(name: str) -> ml_collections.ConfigDict:
    """Returns the full model config of a model with the recipe defaults.

    Args:
      name: a key of `MODELS` ('global' or 'dolg').

    Returns:
      ConfigDict with every key `create_model` accepts (the `dolg` block is
      present for both names, so a command line can switch `name`).

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    _check_name(name)
    config = ml_collections.ConfigDict(
        {"name": name, **_MODEL_DEFAULTS[name], "dolg": dict(_DOLG_DEFAULTS)}
    )
    for key, (default, field_type) in _BACKBONE_OPTIONS.items():
        config[key] = ml_collections.FieldReference(default, field_type=field_type)
    return config


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    if isinstance(config, Mapping):
        return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    raise TypeError(f"model config must be a ConfigDict or a mapping, got {type(config)}")


def _merge_checked(defaults: Mapping[str, Any], given: Mapping[str, Any], where: str) -> dict:
    """Overlays `given` on `defaults`; a key absent from the defaults is an error."""
    merged = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ValueError(
                f"unknown key {where + key!r} in model config; valid: {sorted(defaults)}"
            )
        if isinstance(defaults[key], Mapping):
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"model config key {where + key!r} must be a mapping, got {value!r}"
                )
            value = _merge_checked(defaults[key], value, f"{where}{key}.")
        merged[key] = value
    return merged


def resolve_model_config(model_config: Any) -> dict[str, Any]:
    """Validates a model config and fills missing keys from the name's defaults.

    Args:
      model_config: ConfigDict or mapping with at least `name`.

    Returns:
      A plain dict with every key of `default_model_config(name)`.

    Raises:
      ValueError: unknown model name, unknown key (named), or an unknown
        pooling / neck / dtype / global_branch value, each listing valid ones.
    """
    given = _as_dict(model_config)
    name = _check_name(given.get("name"))
    cfg = _merge_checked(default_model_config(name).to_dict(), given, "")
    layers.make_pooling(cfg["pooling"])
    layers.check_neck(cfg["neck"])
    dolg.check_global_branch(cfg["dolg"]["global_branch"])
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"unknown dtype {cfg['dtype']!r}; valid: {sorted(DTYPES)}")
    if cfg["descriptor"] not in DESCRIPTORS:
        raise ValueError(
            f"unknown model.descriptor {cfg['descriptor']!r}; valid: {sorted(DESCRIPTORS)}"
        )
    _resolve_backbone_options(cfg)
    return cfg


def _resolve_backbone_options(cfg: dict[str, Any]) -> None:
    """Checks the backbone options and replaces each None by its meaning."""
    backbone = cfg["backbone"]
    if cfg["input_normalization"] is None:
        cfg["input_normalization"] = "imagenet"
    input_normalization.get_input_normalization(cfg["input_normalization"])

    default_padding = backbones.backbone_option(backbone, "padding")
    if cfg["padding"] is None:
        cfg["padding"] = default_padding
    elif default_padding is None:
        raise ValueError(
            f"model.padding={cfg['padding']!r}, but {backbone} has no padding option; "
            "leave model.padding unset (None)"
        )
    elif cfg["padding"] not in efficientnet.PADDINGS:
        raise ValueError(f"model.padding={cfg['padding']!r}; valid: {efficientnet.PADDINGS}")

    default_rate = backbones.backbone_option(backbone, "drop_connect_rate")
    rate = cfg["drop_connect_rate"]
    if rate is None:
        rate = default_rate if default_rate is not None else 0.0
    elif default_rate is None and rate != 0:
        raise ValueError(
            f"model.drop_connect_rate={rate}, but {backbone} has no stochastic depth; use 0"
        )
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"model.drop_connect_rate={rate}: expected 0 <= rate < 1")
    cfg["drop_connect_rate"] = float(rate)
    if cfg["conv_lowering"] not in conv_lowering.CONV_LOWERINGS:
        raise ValueError(
            f"model.conv_lowering={cfg['conv_lowering']!r}; valid: {conv_lowering.CONV_LOWERINGS}"
        )
    if cfg["batch_norm"] not in layers.BATCH_NORM_MODES:
        raise ValueError(
            f"model.batch_norm={cfg['batch_norm']!r}; valid: {layers.BATCH_NORM_MODES}"
        )
    if cfg["remat"] not in layers.REMAT_MODES:
        raise ValueError(f"model.remat={cfg['remat']!r}; valid: {layers.REMAT_MODES}")


def create_model(model_config: Any) -> nn.Module:
    """Builds a retrieval model from its config.

    Args:
      model_config: ConfigDict or mapping (see the module docstring for the
        keys; missing keys take `default_model_config(name)` values).

    Returns:
      An unbound linen module: `__call__(images [B,H,W,3] in 0..255,
      train=False) -> [B, embedding_dim] float32` embedding, not normalised.

    Raises:
      ValueError: unknown model name, unknown config key (named), unknown
        backbone or variant names (each error lists the valid values).
    """
    cfg = resolve_model_config(model_config)
    dtype = DTYPES[cfg["dtype"]]
    options: dict[str, Any] = {
        "dtype": dtype,
        "batch_norm": cfg["batch_norm"],
        "conv_lowering": cfg["conv_lowering"],
        "remat": cfg["remat"],
    }
    if cfg["padding"] is not None:
        options["padding"] = cfg["padding"]
    if backbones.backbone_option(cfg["backbone"], "drop_connect_rate") is not None:
        options["drop_connect_rate"] = cfg["drop_connect_rate"]
    backbone = backbones.create_backbone(
        cfg["backbone"], input_normalization=cfg["input_normalization"], **options
    )
    return MODELS[cfg["name"]](cfg, backbone, dtype)
