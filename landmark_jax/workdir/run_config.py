"""A run's recorded config: config.json, where its model's input convention
comes from, and the config evaluation rebuilds a workdir's model from.

A run's model describes itself. The input convention of the weights, the
per-channel pixel affine (`model.input_normalization`, a preset name) and
EfficientNet's stride-2 padding (`model.padding`), is a property of the
weights, not of the command that happens to load them. Before training
starts, `resolve_training_config` settles both from every source there is:

- `init.backbone`: the converted weights' backbone.json;
- `init.checkpoint`: the previous stage's config.json;
- the config's own value, when it names one (not None).

Every source that exists must agree with the others (a disagreement is an
error naming both); with no source, the backbone's default applies
('imagenet', 'same'). The whole model block is then written resolved to the
workdir's config.json (`write_run_config`), so that file alone rebuilds the
model: a later stage inherits the convention from it, and evaluation
(`evaluation_config`) rebuilds each workdir's model from it, taking only
`data_dir` and `eval.*` from the command line.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from landmark_jax.data import data_format
from landmark_jax.models import backbone_checkpoint, input_normalization
from landmark_jax.models.factory import resolve_model_config
from landmark_jax.runtime import file_io
from landmark_jax.workdir import checkpointing

CONFIG_FILE = "config.json"
# The model keys that describe what input the weights expect.
CONVENTION_KEYS = ("input_normalization", "padding")
# What every config.json holds beyond the config as given: the resolved input
# convention (resolve_training_config; model.padding is null for a ResNet)
# and the class set (resolve_classes).
_RECORDED_KEYS = {
    "model.input_normalization": False,
    "model.padding": True,
    "num_classes": False,
    "classes_sha256": False,
}


def _run_dir(path: str) -> str:
    """A workdir, given the workdir or its checkpoints/ folder."""
    trimmed = path.rstrip("/")
    if file_io.basename(trimmed) == checkpointing.CHECKPOINT_DIR:
        return file_io.dirname(trimmed)
    return path


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded in its workdir.

    Args:
      workdir: a training workdir (or its checkpoints/ folder).

    Returns:
      The config.json as a ConfigDict (JSON types: tuples read as lists).

    Raises:
      FileNotFoundError: the folder has no config.json.
      ValueError: the config.json lacks what the trainer records (the input
        convention, the class set): named, with how to rebuild the run.
    """
    path = file_io.join(_run_dir(workdir), CONFIG_FILE)
    if not file_io.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a training workdir")
    recorded = file_io.read_json(path)
    for key, may_be_null in _RECORDED_KEYS.items():
        value = _get_path(recorded, key)
        if isinstance(value, KeyError) or (value is None and not may_be_null):
            raise ValueError(
                f"{path} does not record {key}, which the trainer records for every run "
                f"({', '.join(_RECORDED_KEYS)}): it was written by an earlier version of "
                "landmark_jax. Train the run again into a new workdir (python -m "
                "landmark_jax.train --config=... --workdir=NEW)"
            )
    return ml_collections.ConfigDict(recorded)


def _same_convention(key: str, a: Any, b: Any) -> bool:
    if key == "input_normalization":
        # Presets that are equal as affines (keras_efficientnet_imagenet is
        # imagenet up to rounding) are the same convention.
        pa = input_normalization.get_input_normalization(a)
        pb = input_normalization.get_input_normalization(b)
        return input_normalization.match_input_normalization(pa.scale, pa.offset) == (
            input_normalization.match_input_normalization(pb.scale, pb.offset)
        )
    return a == b


def _backbone_source(config: ml_collections.ConfigDict) -> dict[str, Any]:
    path = config.init.backbone
    metadata = backbone_checkpoint.read_backbone_metadata(path)
    if metadata["arch"] != config.model.backbone:
        raise ValueError(
            f"config.init.backbone={path!r} holds {metadata['arch']} weights but "
            f"config.model.backbone={config.model.backbone!r}"
        )
    return {k: metadata[k] for k in CONVENTION_KEYS}


def _stage_source(config: ml_collections.ConfigDict) -> dict[str, Any]:
    previous = read_run_config(config.init.checkpoint).model
    return {k: previous[k] for k in CONVENTION_KEYS}


def resolve_training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with every model key resolved, the input convention from its sources.

    Args:
      config: a validated training config (see config_lib.validate_config).

    Returns:
      A copy whose `model` block is complete and concrete
      (`factory.resolve_model_config`), with `input_normalization` and
      `padding` taken from init.backbone / init.checkpoint where set.

    Raises:
      ValueError: two sources (or a source and the config's own value)
        disagree, naming both; init.backbone holds another architecture, or
        its backbone.json or init.checkpoint's config.json records no
        convention (backbone_checkpoint.read_backbone_metadata,
        read_run_config).
      FileNotFoundError: init.checkpoint has no config.json.
    """
    config = config.copy_and_resolve_references()
    sources: list[tuple[str, dict[str, Any]]] = [
        (f"config.model ({key} as given)", {key: config.model[key]})
        for key in CONVENTION_KEYS
        if config.model[key] is not None
    ]
    if config.init.backbone:
        sources.append(
            (
                f"the weights in config.init.backbone={config.init.backbone!r}",
                _backbone_source(config),
            )
        )
    if config.init.checkpoint:
        sources.append(
            (
                f"the previous stage config.init.checkpoint={config.init.checkpoint!r}",
                _stage_source(config),
            )
        )

    resolved: dict[str, tuple[str, Any]] = {}
    for where, convention in sources:
        for key, value in convention.items():
            if key not in resolved:
                resolved[key] = (where, value)
            elif not _same_convention(key, resolved[key][1], value):
                first, first_value = resolved[key]
                raise ValueError(
                    f"model.{key}: {first} says {first_value!r} but {where} says {value!r}; "
                    "a run must use its weights' input convention"
                )
    for key, (where, value) in resolved.items():
        config.model[key] = value
        logging.info("model.%s = %r (from %s)", key, value, where)
    model = resolve_model_config(config.model)
    for key, value in model.items():
        if key != "dolg":
            config.model[key] = value
    return config


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to resume a workdir's checkpoints with another input convention or class set.

    Args:
      config: the resolved config, after resolve_classes.
      workdir: the workdir to resume.

    Raises:
      ValueError: the workdir's checkpoints were trained with another
        model.input_normalization or model.padding, or on another class set
        (both named).
    """
    path = file_io.join(workdir, CONFIG_FILE)
    if not file_io.isfile(path) or checkpointing.latest_step(workdir) is None:
        return
    recorded = read_run_config(workdir)
    check_classes(recorded, config, f"the workdir {workdir} ({path})")
    saved = recorded.model
    for key in CONVENTION_KEYS:
        if not _same_convention(key, saved[key], config.model[key]):
            raise ValueError(
                f"{workdir} was trained with model.{key}={saved[key]!r} ({path}) but "
                f"this config resolves to {config.model[key]!r}; resume with the "
                "workdir's convention or start a new workdir"
            )


# Keys whose change since a checkpoint does not bear on its state or its loss.
_BOOKKEEPING_KEYS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints")
_BOOKKEEPING_BLOCKS = ("val", "eval", "input")


def classes_sha256(landmark_ids: Sequence[int]) -> str:
    """The identity of a class set: SHA-256 of its landmark ids in label order."""
    return hashlib.sha256(",".join(str(int(i)) for i in landmark_ids).encode()).hexdigest()


def resolve_classes(config: ml_collections.ConfigDict) -> data_format.LabelMap:
    """The data's classes, checked against config.num_classes and recorded in the config.

    Sets config.num_classes and config.classes_sha256 to the data's, which
    config.json then records (a resume, a later stage and evaluation check
    them with check_classes).

    Returns:
      The data's label map (landmark ids and per-class counts, label order).

    Raises:
      ValueError: config.num_classes is set and differs from the data's.
      DataFormatError: config.data_dir is not a TFDS build with a `label`
        ClassLabel and per-class counts.
    """
    from_data = data_format.read_num_classes(config.data_dir)
    if config.num_classes is not None and config.num_classes != from_data:
        raise ValueError(
            f"config.num_classes={config.num_classes} but the data set in "
            f"{config.data_dir} has {from_data} classes (its features.json); fix "
            "config.num_classes or point config.data_dir at the right data"
        )
    label_map = data_format.read_label_map(config.data_dir)
    config.num_classes = label_map.num_classes
    config.classes_sha256 = classes_sha256(label_map.landmark_ids)
    return label_map


def check_classes(
    recorded: Mapping[str, Any], config: ml_collections.ConfigDict, what: str
) -> None:
    """Refuses weights of one class set for another (the head is padded, so shapes agree).

    Args:
      recorded: the config.json of the run the weights come from.
      config: this run's config, after resolve_classes.
      what: the weights' role and path, for the message.

    Raises:
      ValueError: another class count, or the same count of other landmark
        ids, naming both and both data sets.
    """
    count, digest = recorded["num_classes"], recorded["classes_sha256"]
    if count != config.num_classes:
        raise ValueError(
            f"{what} was trained on {count} classes (data_dir={recorded.get('data_dir')!r}) but "
            f"config.data_dir={config.data_dir!r} has {config.num_classes}; its head's rows "
            "would mean other landmarks: point config.data_dir at the run's data, or start a "
            "new head with init.carry='model' in a new workdir"
        )
    if digest != config.classes_sha256:
        raise ValueError(
            f"{what} was trained on {count} classes (data_dir={recorded.get('data_dir')!r}) and "
            f"config.data_dir={config.data_dir!r} has as many, but other landmark ids (their "
            "SHA-256 differ); its head's rows would mean other landmarks: point "
            "config.data_dir at the run's data, or start a new head with "
            "init.carry='model' in a new workdir"
        )


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _normalised(value)
    return flat


def changes_since_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """The config keys that differ from the workdir's config.json, 'key: old -> new'.

    config.json is rewritten at each start, so it holds the config that wrote
    the latest checkpoint. Keys that only say how often to log, save or
    validate are left out, as are data_dir (a moved copy of the same data is
    no change; the class check guards what matters) and total_steps.

    Returns:
      The changed keys, sorted; empty when there is no config.json.
    """
    if not file_io.isfile(file_io.join(workdir, CONFIG_FILE)):
        return []
    old = _flat(read_run_config(workdir).to_dict())
    new = _flat(config.to_dict())
    skipped = (*_BOOKKEEPING_KEYS, "data_dir", "total_steps", "num_classes", "classes_sha256")
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in skipped or key.split(".")[0] in _BOOKKEEPING_BLOCKS:
            continue
        if old.get(key, "(unset)") != new.get(key, "(unset)"):
            changes.append(f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}")
    return changes


def write_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config to <workdir>/config.json.

    Call it once the run's state is in place (initialised or restored), so a
    start that fails (e.g. a resumed config whose shapes do not fit) leaves
    the workdir's record of its model as it was.
    """
    file_io.write_text(file_io.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def _get_path(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return KeyError(dotted)
        value = value[part]
    return value


def _normalised(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_normalised(v) for v in value)
    return value


def evaluation_config(
    config: ml_collections.ConfigDict,
    workdir: str,
    model_overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The config to evaluate a workdir with: its own config.json, our data and eval.

    The model (and everything else about the run: image_size, head, ...)
    comes from the workdir's config.json; `config` contributes `data_dir`
    (when set) and the `eval` block.

    Args:
      config: the command line's config.
      workdir: the training workdir.
      model_overrides: the model keys given on the command line, flat
        ('model.padding' -> value); each must equal the workdir's.

    Returns:
      A ConfigDict with the workdir's resolved model block.

    Raises:
      FileNotFoundError: the workdir has no config.json.
      ValueError: its config.json does not record the input convention, or
        a command-line model key disagrees with it (both named).
    """
    saved = read_run_config(workdir)
    path = file_io.join(_run_dir(workdir), CONFIG_FILE)
    for key, value in (model_overrides or {}).items():
        recorded = _get_path(saved.to_dict(), key)
        if isinstance(recorded, KeyError) or _normalised(recorded) != _normalised(value):
            shown = "nothing" if isinstance(recorded, KeyError) else repr(recorded)
            raise ValueError(
                f"--config.{key}={value!r} but {path} records {shown}: evaluation rebuilds "
                "the model from the workdir's config.json; drop the flag"
            )
    merged = ml_collections.ConfigDict(saved.to_dict())
    merged.model = resolve_model_config(saved.model)
    if config.data_dir:
        merged.data_dir = config.data_dir
    else:
        logging.info("config.data_dir is empty: evaluating on %s's data_dir", workdir)
    merged.eval = config.eval.copy_and_resolve_references()
    return merged
