"""SuperGlobal's pooling as options of an evaluation: from the eval block to the extraction.

The four operations of models/superglobal_pooling.py (GeM+, Regional-GeM,
Scale-GeM, ReLU+; Shao et al., ICCV 2023) change how a trained run's
descriptors are computed, not its weights or its training. The eval block
turns them on (config_lib: eval.gem_plus, eval.regional_gem,
eval.scale_gem, eval.relu_plus, each with its parameters; all off by
default), and they flow as one JSON-ready dict:

    options_from_config(config)      the dict, in extract.extraction_options,
                                     so the embedding cache records it and a
                                     changed option re-extracts
    with_options(module, options)    the model extract (and the export) apply:
                                     GeM+ / Regional-GeM at its pooling site,
                                     ReLU+ in its ResNet backbone
    options['scale_gem']             extract (and the export) combine the
                                     scales by Scale-GeM instead of summing

Where an option cannot act on a model, `with_options` raises naming the
key; nothing is ignored. GeM+ replaces whatever pooling the run trained with,
GAP included, as the released code replaces its trained GeM (its p unused);
on DOLG it acts on the global branch's pooling (the stride-32 map), the only
GeM of that model. ReLU+ exists only where a ResNet has ReLUs to replace: an
EfficientNet (swish) is refused.

Two things the released code does not have to decide: with eval.flip, a
scale's descriptor is the sum of its two unit views (as without the options)
and Scale-GeM takes the maximum over the scales of those, normalised; and
the code's CVNet head L2-normalises the pooled vector before its FC, which
the models here (trained without it) do not, so GeM+ also changes the scale
of what the neck receives, as it would on any model trained without that
normalisation.

With every option off the options are `OFF`, `with_options` returns the
model itself and the extraction sums the scales as before: the same
programs, the same descriptors bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from landmark_jax.models import superglobal_pooling

# The options with every operation off.
OFF: dict[str, Any] = {
    "gem_plus_p": None,
    "regional_gem": None,
    "scale_gem": False,
    "relu_plus_alpha": None,
}
# The eval keys that turn the operations on, in the order of the code's pipeline.
SWITCHES = ("relu_plus", "regional_gem", "gem_plus", "scale_gem")


def options_from_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The SuperGlobal options an evaluation config's eval block asks for.

    A parameter is recorded only when its operation is on, so changing the
    parameter of an operation that is off changes nothing (and re-extracts
    nothing). A config without the keys (older than them) asks for none.

    Args:
      config: a config with an `eval` block (validated by
        eval_config.validate_eval_config).

    Returns:
      {'gem_plus_p': float | None, 'regional_gem': {'p': float, 'size': int}
      | None, 'scale_gem': bool, 'relu_plus_alpha': float | None}; `OFF`
      when none is on.
    """
    ec = config.eval
    options = dict(OFF)
    if ec.get("gem_plus", False):
        options["gem_plus_p"] = float(ec.gem_plus_p)
    if ec.get("regional_gem", False):
        options["regional_gem"] = {"p": float(ec.regional_gem_p), "size": int(ec.regional_gem_size)}
    options["scale_gem"] = bool(ec.get("scale_gem", False))
    if ec.get("relu_plus", False):
        options["relu_plus_alpha"] = float(ec.relu_plus_alpha)
    return options


def is_off(options: Mapping[str, Any] | None) -> bool:
    """True when `options` (None: none given) turn no operation on."""
    return options is None or dict(options) == OFF


def with_options(module: Any, options: Mapping[str, Any] | None) -> Any:
    """The model to extract with: `module` with SuperGlobal's pooling and ReLU+ set.

    Args:
      module: a model of factory.create_model (GlobalModel or DOLG), or any
        other module when `options` are off.
      options: `options_from_config`'s dict, or None (off).

    Returns:
      `module` itself when no model-side option is on (Scale-GeM acts on the
      scales, not the model); else a clone with `pool_override` and/or its
      backbone's `relu_plus` set. The variables are the same.

    Raises:
      ValueError: naming the eval key, when GeM+ or Regional-GeM is asked of
        a model without a pooling site to override, or ReLU+ of a model
        whose backbone has no ReLUs to replace.
    """
    if is_off(options):
        return module
    regional = options["regional_gem"]
    if options["gem_plus_p"] is not None or regional is not None:
        if not hasattr(module, "pool_override"):
            keys = [
                k
                for k, on in (("gem_plus", options["gem_plus_p"]), ("regional_gem", regional))
                if on
            ]
            raise ValueError(
                f"config.eval.{'/'.join(keys)}=True: SuperGlobal's pooling replaces the pooling "
                f"of a GlobalModel or of DOLG's global branch; {type(module).__name__} has none"
            )
        override = superglobal_pooling.PoolingOverride(
            gem_plus_p=options["gem_plus_p"],
            regional_gem_p=None if regional is None else float(regional["p"]),
            regional_gem_size=(
                superglobal_pooling.REGIONAL_GEM_SIZE if regional is None else int(regional["size"])
            ),
        )
        module = module.clone(pool_override=override)
    alpha = options["relu_plus_alpha"]
    if alpha is not None:
        backbone = getattr(module, "backbone", None)
        if not hasattr(backbone, "relu_plus"):
            raise ValueError(
                "config.eval.relu_plus=True: ReLU+ replaces ReLUs of a ResNet backbone "
                "(SuperGlobal's model/resnet.py: conv2-conv4's block outputs, conv2's inner "
                f"activations); this run's backbone {type(backbone).__name__} has none "
                "(an EfficientNet's activations are swish)"
            )
        module = module.clone(backbone=backbone.clone(relu_plus=float(alpha)))
    return module


def scale_gem(options: Mapping[str, Any] | None) -> bool:
    """Whether `options` combine an image's scales by Scale-GeM (p = inf)."""
    return not is_off(options) and bool(options["scale_gem"])
