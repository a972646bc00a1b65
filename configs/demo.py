r"""The demo: a small GLR2020-style model on the embedded demo data set.

    make demo
    # or, after the demo data is built:
    python -m landmark_jax.train --config=configs/demo.py --workdir=workdirs/demo

A small ResNet (`resnet_small`: one bottleneck block per stage) + GAP +
Dense(512, swish) embedding + AdaCos cosine-softmax head, SGD with momentum,
flip-only augmentation: the GLR2020 recipe shrunk to train in about three
minutes on 2 CPU cores, from scratch.

Expected (measured on 2 CPU cores, seed 0): the training loss falls from
about 4.5 to about 2.3 over 600 steps, validation accuracy reaches about 40%
(chance 1/80), and retrieval on the 216 queries of the 140 unseen index
landmarks gives mAP@100 0.038, against 0.033 for raw pixels, 0.019 for the
untrained network and 0.005 for a random ranking (GAP 0.09): training beats
the untrained network 2x but raw pixels only narrowly. Tried on the same data
(mAP@100; raw pixels 0.030 +- 0.004 with ScaNN's approximate search, 0.033
exact): efficientnet_tiny 0.011 (it learns slowly on a CPU); a 64-d embedding
0.033; Adam 2e-3 with a fixed scale 16 0.027 (higher
validation accuracy, worse retrieval); 48 px, lr 0.3, 900 steps 0.032; GeM
0.034; ArcFace m=0.3 s=30 does not learn in 600 steps (0.006); 300 train
landmarks of up to 25 images 0.020 (raw pixels 0.044 there).

`configs/demo.py:smoke` shrinks it further (a few seconds per step on CPU,
a handful of steps) for tests and quick checks.
"""

from landmark_jax import config_lib


def get_config(arg: str | None = None):
    """The demo config; arg 'smoke' gives the seconds-long variant."""
    _, smoke = config_lib.parse_config_arg(arg, (), None, "configs/demo.py")
    config = config_lib.base_config("global")
    config.data_dir = "demo_data/tfrecords"
    config.model.backbone = "resnet_small"
    config.model.embedding_dim = 512
    # Search with the pooled backbone features, not the 512-d neck output
    # the head trains on (see the docstring for why and what it buys).
    config.model.descriptor = "pooled"
    config.image_size = 64
    config.batch_size = 32
    config.total_steps = 1000
    config.log_every_steps = 20
    config.checkpoint_every_steps = 250
    config.val.every_steps = 500
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
    # From scratch on 80 landmarks: weight decay keeps the features general.
    config.optimizer.weight_decay = 5e-4
    config.input.files_per_chunk = 4
    config.input.shuffle_buffer = 512
    config.eval.retrieval_solution = "demo_data/raw/retrieval_solution.csv"
    config.eval.recognition_solution = "demo_data/raw/recognition_solution.csv"
    # Recognition scores lowered by similarity to known non-landmark images.
    config.eval.non_landmark_split = "nonlandmark"
    # What training bought: the same queries scored by the untrained model,
    # raw pixels and a random ranking (evaluate prints them side by side).
    config.eval.baselines = ("untrained", "raw_pixels", "chance")
    # Exact search: the demo's index is small, and ScaNN's approximate
    # neighbours would move every figure by a few points from run to run.
    config.eval.knn_backend = "exact"
    if smoke:
        config_lib.apply_smoke(config, image_size=32, total_steps=6, checkpoint_every_steps=3)
    return config
