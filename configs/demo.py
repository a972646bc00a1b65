r"""The demo: a small GLR2020-style model on the embedded demo data set.

    make demo
    # or, after the demo data is built:
    python -m landmark_jax.train --config=configs/demo.py --workdir=workdirs/demo

A tiny EfficientNet + GAP + Dense(swish) embedding + AdaCos cosine-softmax
head, SGD with momentum, flip-only augmentation: the GLR2020 recipe shrunk to
run in about three minutes on 2 CPU cores. Expected: the training loss falls
from about 3.9 to about 3.0 over 600 steps and validation accuracy rises to
several times chance (1/80).

`configs/demo.py:smoke` shrinks it further (a few seconds per step on CPU,
a handful of steps) for tests and quick checks.
"""

from landmark_jax import config_lib


def get_config(arg: str | None = None):
    """The demo config; arg 'smoke' gives the seconds-long variant."""
    _, smoke = config_lib.parse_config_arg(arg, (), None, "configs/demo.py")
    config = config_lib.base_config("global")
    config.data_dir = "demo_data/tfrecords"
    config.model.backbone = "efficientnet_tiny"
    config.model.embedding_dim = 64
    config.image_size = 64
    config.batch_size = 32
    config.total_steps = 600
    config.log_every_steps = 20
    config.checkpoint_every_steps = 100
    config.val.every_steps = 200
    # Retrieval mAP@100 of the unseen landmarks at each validation step.
    config.val.retrieval_solution = "demo_data/raw/retrieval_solution.csv"
    config.head.scale = "adacos_dynamic"
    config.loss.class_weights = "inv_log1p"
    config.loss.not_clean_weight = 0.5
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_steps = 20
    config.input.files_per_chunk = 4
    config.input.shuffle_buffer = 512
    config.eval.retrieval_solution = "demo_data/raw/retrieval_solution.csv"
    config.eval.recognition_solution = "demo_data/raw/recognition_solution.csv"
    # What training bought: the same queries scored by the untrained model,
    # raw pixels and a random ranking (evaluate prints them side by side).
    config.eval.baselines = ("untrained", "raw_pixels", "chance")
    if smoke:
        config_lib.apply_smoke(config, image_size=32, total_steps=6, checkpoint_every_steps=3)
    return config
