"""Training configs: the defaults every config starts from, and validation.

Configs are data (`configs/NAME.py` with `get_config(arg)`); this module holds
the shared defaults (`base_config()`) and `validate_config`, which checks a
config against the data folder and the device mesh *before* anything is
compiled, so a wrong class count, image size or batch size fails in a second
with a message naming the config key.
"""

from __future__ import annotations

import math

import ml_collections

from landmark_jax.data import augmentation_settings
from landmark_jax.models import backbones
from landmark_jax.models.factory import default_model_config, resolve_model_config
from landmark_jax.runtime import file_io
from landmark_jax.training import heads, losses

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "inverse_time", "warmup_cosine")
INIT_CARRY = ("model", "all")


def base_config(model_name: str = "global") -> ml_collections.ConfigDict:
    """The keys every training config has, with GLR2020-style defaults.

    Args:
      model_name: 'global' (GLR2020) or 'dolg' (GLR2021) model defaults.

    Returns:
      A ConfigDict; configs override what their recipe changes.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data_dir = ""  # the builder's output folder (local or gs://)
    c.num_classes = ml_collections.FieldReference(
        None, field_type=int
    )  # None: the data set's class count
    # Written by the trainer into config.json (never set by hand): the SHA-256
    # of the build's landmark ids in label order, so that a resume or a
    # carry='all' onto another class set of the same padded size is refused.
    c.classes_sha256 = ml_collections.FieldReference(None, field_type=str)
    c.image_size = 512
    c.batch_size = 64  # global, over all devices of all processes
    c.total_steps = 10_000
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1_000
    c.keep_checkpoints = 3

    # Validation loss / accuracy during training (trainer.py); not to be
    # confused with `eval`, the retrieval / recognition evaluation below.
    c.val = ml_collections.ConfigDict()
    c.val.every_steps = 0  # 0: no in-training validation
    c.val.split = "val"
    # None: batch_size; also extraction's default batch in evaluation
    c.val.batch_size = ml_collections.FieldReference(None, field_type=int)
    # Retrieval mAP@100 at the validation steps (val_map@100): the queries of
    # val.query_split against val.index_split, scored by this solution CSV
    # (id,images,Usage) as evaluate scores them; "" skips it.
    c.val.retrieval_solution = ""
    c.val.query_split = "test"
    c.val.index_split = "index"

    # model.input_normalization and model.padding (the input convention of
    # the weights) left None are resolved before training starts: from
    # init.backbone's backbone.json, else the init.checkpoint run's
    # config.json, else the backbone's default (run_config.py).
    c.model = default_model_config(model_name)

    c.head = ml_collections.ConfigDict()
    c.head.num_subcenters = 1
    # uniform_fan_in: U(+-1/sqrt(D)) (GLR2021, PyTorch) | glorot_uniform (GLR2020, Keras)
    c.head.init = "uniform_fan_in"
    c.head.margin_type = "none"  # none | cosface | arcface
    c.head.margin = 0.0  # a fixed margin (ignored with dynamic_margins)
    c.head.dynamic_margins = False  # m_c = a * normalise(n_c^-1/4) + b
    c.head.margin_a = 0.45
    c.head.margin_b = 0.05
    c.head.easy_margin = False
    c.head.scale = "adacos_dynamic"  # fixed | adacos_fixed | adacos_dynamic
    c.head.scale_value = 30.0  # used by scale='fixed'
    c.head.shard_classes = True  # split the class dimension over devices

    c.loss = ml_collections.ConfigDict()
    c.loss.class_weights = "inv_log1p"  # none | inv_log | inv_log1p
    c.loss.not_clean_weight = 1.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False  # sgd: Nesterov momentum (the official DOLG code's)
    c.optimizer.schedule = "inverse_time"  # keras SGD(decay=...): lr / (1 + decay * t)
    c.optimizer.decay = 1e-5
    c.optimizer.warmup_steps = 0
    # The warmup_cosine schedule's length; None: total_steps. Longer than
    # total_steps stops training part-way down the cosine, as GLR2021's step 2
    # did (a 40-epoch schedule stopped after epoch 29).
    c.optimizer.schedule_steps = ml_collections.FieldReference(None, field_type=int)
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)

    c.input = ml_collections.ConfigDict()
    c.input.files_per_chunk = 16
    c.input.shuffle_buffer = 4096
    c.input.flip = True
    # GLR2021's other augmentations (train_augmentation.py), off at prob 0.
    c.input.jpeg = ml_collections.ConfigDict({"prob": 0.0, "quality": (99, 100)})
    c.input.shift_scale_rotate = ml_collections.ConfigDict(
        {"prob": 0.0, "shift": 0.2, "scale": 0.2, "rotate": 10.0}
    )
    c.input.cutout = ml_collections.ConfigDict({"prob": 0.0, "size": 0.4})

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # a previous stage's workdir (or its checkpoints/ folder)
    c.init.carry = "model"  # model: backbone + neck, new head | all: head too
    c.init.backbone = ""  # a keras_import output folder

    # Retrieval / recognition evaluation (python -m landmark_jax.evaluate).
    c.eval = ml_collections.ConfigDict()
    c.eval.retrieval_solution = ""  # retrieval_solution.csv: scores mAP@100
    c.eval.recognition_solution = ""  # recognition_solution.csv: scores GAP
    c.eval.index_split = "index"  # "": no GLDv2 retrieval or recognition (Revisited only)
    c.eval.test_split = "test"
    c.eval.train_split = "train"  # recognition by kNN against it; "" skips recognition
    # Recognition (every train_split image embedded: 4.1M for GLDv2) runs only
    # when something reads it: recognition_solution scores it, or this asks
    # for recognition_submission.csv without a solution (GLR2021's output).
    c.eval.recognition_submission = False
    c.eval.knn_backend = "scann"  # scann | exact | approx_max_k (TPU)
    c.eval.k = 100
    c.eval.recall_queries = 1000  # queries sampled to report ScaNN's recall vs exact
    # Re-ranking after the first search, in order (retrieval/rerank.py), e.g.
    # ("dba(n=1, alpha=3)", "alpha_qe(n=2, alpha=3)"): applied to the GLDv2
    # retrieval and the Revisited benchmark; evaluate reports every ranking's
    # figures side by side (metrics['rerank']) and submits the last ranking.
    c.eval.rerank = ()
    # Also re-rank the recognition kNN (the train split as the index: a dba
    # step augments every train descriptor, 4.1M for GLDv2).
    c.eval.rerank_recognition = False
    # The released 2020 3rd-place notebook (reused by the GLR2021 winners): TOP_K = 5.
    c.eval.recognition_k = 5
    c.eval.recognition_power = 9.0  # neighbour votes are cos^p
    # Fuse the votes with the trained head's top-m classes (cos^p * head^q).
    c.eval.classifier_fusion = False
    c.eval.classifier_top_m = 5
    c.eval.classifier_power = 10.0
    # Known non-landmark images (a builder split, e.g. 'nonlandmark'): a test
    # image's score loses weight x its vote sum cos^p over its non_landmark_k
    # nearest ones (retrieval/non_landmarks.py); "" skips it. None: as many
    # neighbours as the landmark vote (recognition_k), so both votes are on
    # one scale.
    c.eval.non_landmark_split = ""
    c.eval.non_landmark_k = ml_collections.FieldReference(None, field_type=int)
    c.eval.non_landmark_weight = 1.0
    c.eval.scales = (1.0,)  # e.g. (0.7071, 1.0, 1.4142)
    c.eval.flip = False
    c.eval.image_size = ml_collections.FieldReference(None, field_type=int)  # None: image_size
    # square (GLR2020) | longer_side | native; the last two keep the aspect ratio
    c.eval.resize = "square"
    c.eval.revisited_resize = "native"  # Revisited: each image x scale, DOLG's protocol
    c.eval.size_multiple = 1  # aspect kept: sides rounded to a multiple (fewer programs)
    # SuperGlobal's pooling (Shao et al., ICCV 2023; models/superglobal_pooling.py),
    # applied to the trained run at extraction, no retraining; all off by default
    # (descriptors then unchanged). Parameters default to the released code's.
    c.eval.gem_plus = False  # GeM+: GeM at p=gem_plus_p (eps 1e-8) replaces the trained pooling
    c.eval.gem_plus_p = 4.6
    # Regional-GeM: the pooled map x becomes 0.5 * x + 0.5 * its power mean
    # (p=regional_gem_p) over regional_gem_size^2 windows (odd side, stride 1)
    c.eval.regional_gem = False
    c.eval.regional_gem_p = 2.5
    c.eval.regional_gem_size = 5
    # Scale-GeM (p = inf): eval.scales (two or more) combined by the element-wise
    # maximum of each scale's unit descriptor instead of their mean
    c.eval.scale_gem = False
    # ReLU+: a ResNet backbone's ReLUs after conv2-conv4's blocks and inside
    # conv2's become max(x, relu_plus_alpha) (no EfficientNet: swish)
    c.eval.relu_plus = False
    c.eval.relu_plus_alpha = 0.014
    c.eval.gallery_queries = 8
    # Scored beside the learned model on the same queries (retrieval/baselines.py):
    # any of 'untrained', 'raw_pixels', 'chance'; needs eval.retrieval_solution.
    c.eval.baselines = ()
    c.eval.raw_pixel_size = 64  # raw_pixels: images resized to this side, squared
    # A TFDS build of revisited_oxford_paris (ROxford5k / RParis6k; the build
    # folder, or a folder with exactly one build below it): when set,
    # evaluation also reports the easy / medium / hard mAP and mP@k.
    c.eval.revisited_data_dir = ""
    # GLR2020 ensemble: [{'workdir': ..., 'weight': 1.0, 'image_size': 640}, ...];
    # empty: the evaluated workdir alone.
    c.eval.ensemble = ()

    c.nonfinite = ml_collections.ConfigDict()
    c.nonfinite.skip_updates = False  # False: stop at the first non-finite loss
    c.nonfinite.max_skipped = 10
    return c


def parse_config_arg(
    arg: str | None, choices, default: str | None, config_file: str
) -> tuple[str | None, bool]:
    """Parses a config's `arg`: 'CHOICE', 'CHOICE,smoke', or (no choices) 'smoke'.

    Args:
      arg: what followed `config.py:` on the command line (None or '': default).
      choices: the config's stage names; empty for a config without stages.
      default: the stage taken when arg names none (None without stages).
      config_file: the config's path, for the error message.

    Returns:
      (stage, smoke): the stage name (default when arg names none) and
      whether ',smoke' (or 'smoke' alone, for a config without stages) was given.

    Raises:
      ValueError: an unknown stage or suffix; the message lists the valid args.
    """
    parts = arg.split(",") if arg else []
    if not choices:
        if parts in ([], ["smoke"]):
            return default, bool(parts)
        raise ValueError(f"{config_file}: unknown arg {arg!r}; valid: 'smoke' or none")
    stage = parts[0] if parts else default
    if stage in choices and parts[1:] in ([], ["smoke"]):
        return stage, parts[1:] == ["smoke"]
    raise ValueError(
        f"{config_file}: arg {arg!r}; valid: "
        f"one of {sorted(choices)}, optionally followed by ',smoke'"
    )


def apply_smoke(
    config: ml_collections.ConfigDict,
    *,
    image_size: int,
    total_steps: int = 4,
    checkpoint_every_steps: int = 2,
) -> ml_collections.ConfigDict:
    """Shrinks a config in place to a seconds-long run on the demo data.

    The tiny EfficientNet with a 64-d embedding, batch 16, a few steps, no
    in-training validation and small input buffers; a config changes what
    its recipe needs beyond these (e.g. DOLG's branch widths) after the call.
    Its convolutions are XLA's (`model.conv_lowering='xla'`, what 'auto' is
    on an accelerator): a run this short is all compiling, and on a CPU the
    demo smoke model's train step traces and compiles in 0.8-0.9x the time
    of 'auto''s im2col matmuls and its extraction in about 0.5x (DOLG's
    smoke step: 0.9-1.0x); im2col's faster steps pay off only over a longer
    run (conv_lowering.py).

    Returns:
      The same config.
    """
    config.data_dir = "demo_data/tfds"
    config.model.backbone = "efficientnet_tiny"
    config.model.embedding_dim = 64
    config.model.conv_lowering = "xla"
    config.image_size = image_size
    config.batch_size = 16
    config.total_steps = total_steps
    config.log_every_steps = 2
    config.checkpoint_every_steps = checkpoint_every_steps
    config.val.every_steps = 0
    config.val.retrieval_solution = ""
    config.input.files_per_chunk = 4
    config.input.shuffle_buffer = 64
    return config


def check_choice(config, key: str, value, choices) -> None:
    """Raises ValueError naming config.<key> when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"config.{key}={value!r}; valid: {list(choices)}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks a training config before any compile.

    Args:
      config: the training config.
      num_devices: devices of the mesh (all processes).

    Raises:
      ValueError: a value out of range or not among the valid names (the
        message names the key), a batch size the devices do not divide, an
        image size the backbone cannot take, or a missing init path.
    """
    if not config.data_dir:
        raise ValueError("config.data_dir is empty: set it to the builder's output folder")
    for key in ("total_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[key] < 1:
            raise ValueError(f"config.{key}={config[key]}: expected >= 1")
    if config.val.every_steps < 0:
        raise ValueError(f"config.val.every_steps={config.val.every_steps}: expected >= 0")
    if config.val.retrieval_solution:
        if not config.val.every_steps:
            raise ValueError(
                f"config.val.retrieval_solution={config.val.retrieval_solution!r} is scored at "
                "the validation steps: set config.val.every_steps > 0"
            )
        if not file_io.exists(config.val.retrieval_solution):
            raise ValueError(
                f"config.val.retrieval_solution={config.val.retrieval_solution!r} does not exist"
            )
    for key, value in (
        ("batch_size", config.batch_size),
        ("val.batch_size", config.val.batch_size),
    ):
        value = value if value is not None else config.batch_size
        if value < 1 or value % num_devices:
            raise ValueError(
                f"config.{key}={value} must be a positive multiple of the {num_devices} devices"
            )
    resolve_model_config(config.model)
    backbones.check_image_size(config.model.backbone, config.image_size)
    check_choice(config, "optimizer.name", config.optimizer.name, OPTIMIZERS)
    check_choice(config, "optimizer.schedule", config.optimizer.schedule, SCHEDULES)
    check_choice(config, "head.margin_type", config.head.margin_type, heads.MARGIN_TYPES)
    check_choice(config, "head.scale", config.head.scale, heads.SCALE_MODES)
    check_choice(config, "head.init", config.head.init, heads.HEAD_INITS)
    check_choice(config, "loss.class_weights", config.loss.class_weights, losses.CLASS_WEIGHT_MODES)
    check_choice(config, "init.carry", config.init.carry, INIT_CARRY)
    augmentation_settings.from_config(config.input)
    if config.optimizer.schedule_steps is not None:
        check_int("optimizer.schedule_steps", config.optimizer.schedule_steps, 1)
    if config.head.num_subcenters < 1:
        raise ValueError(f"config.head.num_subcenters={config.head.num_subcenters}: expected >= 1")
    if not config.loss.not_clean_weight >= 0.0:
        raise ValueError(f"config.loss.not_clean_weight={config.loss.not_clean_weight} < 0")
    for key in ("init.checkpoint", "init.backbone"):
        path = config.init[key.split(".")[1]]
        if path and not file_io.exists(path):
            raise ValueError(f"config.{key}={path!r} does not exist")


def check_int(key: str, value, minimum: int) -> None:
    """Raises ValueError naming config.<key> unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.{key}={value!r}: expected an integer >= {minimum}")


def check_number(key: str, value, minimum: float) -> None:
    """Raises ValueError naming config.<key> unless `value` is a finite number >= minimum."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
    ):
        raise ValueError(f"config.{key}={value!r}: expected a finite number >= {minimum}")
