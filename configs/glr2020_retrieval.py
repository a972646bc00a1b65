r"""GLR2020 retrieval, 1st place (SeungKee Jeon): the staged EfficientNet recipe.

EfficientNet-B7 -> GAP -> Dense(512, swish) embedding -> cosine-softmax head
with the per-batch AdaCos scale and no margin (the released code defines
m=0.5 but never applies it), cross-entropy weighted by 1/ln(n_c) (clean
stage) or 1/ln(n_c + 1) (full stages) and by a not-clean factor, flip-only
augmentation, SGD(lr 1e-3, momentum 0.9) with Keras's per-step decay 1e-5,
global batch 64 (8 per core on a v3-8). Stages, each its own workdir, each
initialised from the previous one:

    # 0. ImageNet weights, converted once (users bring the .h5):
    python -m landmark_jax.models.keras_import --arch=efficientnet_b7 \
        --weights=efficientnetb7_notop.h5 --output=weights/b7
    # 1. GLDv2-clean (81,313 classes), 512 px:
    python -m landmark_jax.train --config=configs/glr2020_retrieval.py:clean \
        --workdir=runs/clean --config.data_dir=DATA_CLEAN --config.init.backbone=weights/b7
    # 2. Full GLDv2 (203,094 classes): new head, backbone + neck carried:
    python -m landmark_jax.train --config=configs/glr2020_retrieval.py:full \
        --workdir=runs/full --config.data_dir=DATA_FULL --config.init.checkpoint=runs/clean
    # 3. 640 px, then 736 px, everything carried:
    python -m landmark_jax.train --config=configs/glr2020_retrieval.py:full640 \
        --workdir=runs/full640 --config.data_dir=DATA_FULL --config.init.checkpoint=runs/full
    python -m landmark_jax.train --config=configs/glr2020_retrieval.py:full736 \
        --workdir=runs/full736 --config.data_dir=DATA_FULL --config.init.checkpoint=runs/full640
    # 4. Not-clean images at half weight:
    python -m landmark_jax.train --config=configs/glr2020_retrieval.py:notclean \
        --workdir=runs/notclean --config.data_dir=DATA_FULL --config.init.checkpoint=runs/full736

Faithful to the released notebooks (v2clean_train.ipynb, v2total_train.ipynb)
in three details a summary would miss:

- Backbone in inference mode while training (`model.batch_norm='frozen'`,
  `model.drop_connect_rate=0`). The notebooks compute `cosine =
  model(images)` inside `tf.GradientTape` without `training=True` (only the
  validation step passes `training=False`). In a TF2 custom loop an unset
  learning phase means inference: every BatchNorm normalises with its
  (ImageNet, then carried) moving statistics and never updates them, while
  gamma/beta still train, and the drop-connect Dropout layers are inactive
  (tensorflow/tensorflow#32864; reproduced with the installed Keras). This
  rests on TF2 semantics, not on a TF 2.3 run.
- Head init `glorot_uniform` (`head.init`): `ArcMarginProduct_v2` creates its
  [512, C] weight with `add_variable` and no initializer, i.e. Keras's
  glorot_uniform (column norm 0.11 at 81,313 classes, 0.07 at 203,094). The
  cosine head's angular step scales like lr/||w||^2, so the PyTorch-style
  U(+-1/sqrt(512)) init (norm 0.58) would learn the new 203,094-class head's
  directions about 66x slower under the same SGD lr 1e-3.
- Class weights count each class's images over the whole CSV (train + the
  held-out val fold), as the notebooks' counts do (see losses.py).

Input convention: stage 1 takes it from the converted weights' backbone.json
(`imagenet` for Keras EfficientNet, whether converted from `imagenet` or a
released `.h5`); every later stage inherits it from the previous stage's
config.json, and evaluation rebuilds each stage's model from its own
config.json, so no flag is repeated.

Images are decoded as stored: TF's decode_jpeg, the notebooks' as this
pipeline's, ignores EXIF orientation, so the builds are made without
`exif_orientation` (gldv2_builder; GLR2021's cv2 reader applies it).

DATA_CLEAN is the `gldv2/clean` TFDS build (`python -m
data_pipelines.build_dataset --dataset=gldv2/clean --manual_dir=GLDV2
--data_dir=TFDS`, then TFDS/gldv2/clean), DATA_FULL the `gldv2/full` build
(every train.csv image, is_clean from train_clean.csv; index and test).
Evaluation (`python -m landmark_jax.evaluate --config=configs/glr2020_retrieval.py:notclean
--workdir=runs/notclean --config.eval.retrieval_solution=...`) is retrieval:
it embeds the index and test splits only (`eval.recognition_submission=False`;
the train split only if a `--config.eval.recognition_solution` is given).
Expected (the published result of the 4-model ensemble of such runs):
private mAP@100 0.38677. The ensemble's members (configs/glr2020_ensemble.py)
stopped this chain at different sizes; what their released checkpoint
folders (export_model.ipynb) say, read by the pattern of the others
(`eff<B>_<size>_..._notclean_0.5_<val loss>`):

    eff7_640_notclean_0.5_1.1411          B7, not-clean stage at 640, fed 640
    eff6_640_notclean_0.5_1.1931          B6, not-clean stage at 640, fed 640
    eff7_512_ver2_10293_NotClean_0.5_640  a second B7 chain ("ver2") at 512
                                          whose not-clean stage ran at 640
                                          (the `_640` suffix; epoch 44), fed 640
    eff7_512_ver1_notclean0.5_1.2580      B7, not-clean stage at 512, fed 512

The third is therefore not "trained at 512, fed 640": its last stage ran at
the size it is fed. Not known: what `10293` stands for (in the others the
last number is the validation loss), and whether that chain went through
the 640 px full stage before its not-clean one; the training notebooks of
these runs were not released. To make such a member, run `:notclean` with
`--config.image_size=640` (or 512) after the stage of that size instead of
after 736. The original trained each stage "until the
validation loss converges"; total_steps below are starting points, watch
val_loss in metrics.jsonl. Append `,smoke` to any stage (e.g.
`:full640,smoke`) for a seconds-long run on the demo data.

Memory: 8 images of B7 per device take about 21 GiB at 512 px (4 at 736
px: 22 GiB), and 3 GiB with `--config.model.remat=blocks`, by the compiled
estimate (experiments/benchmarks/step_memory.py, docs/benchmarks.md; XLA on
CPU, a TPU's layout differs). A v3 or v5e core (16 GiB) therefore wants
remat for the published batch, a v4 chip or v6e (32 GiB) does not; the
notebook's gldv2 mode decides it from the device. Remat is off here, as in
the original (Keras on TPU, whose compiler rematerialises on its own when a
program exceeds HBM): the trainer compiles the step before training and,
if a device cannot hold it, stops naming batch_size and model.remat.

Re-ranking (README "Re-ranking"): the winners ranked by one kNN over the
ensemble descriptor, with no query expansion, database augmentation or
re-ranking, and so does this config (`eval.rerank=()`). To try the cheap
global-descriptor steps on GLDv2, add e.g.
`--config.eval.rerank='("dba(n=1, alpha=3)", "alpha_qe(n=2, alpha=3)")'`
(Radenović et al. 2018's alpha=3; n small, tuned on your validation split)
or `'("superglobal(m=400, k=9, beta=0.15)",)'` (SuperGlobal's released
defaults; its paper reports ROxford/RParis Hard 80.2/86.7 for its full
system, not GLDv2 mAP@100). Each is scored beside the first search, so the
gain is measured on the same descriptors; none is part of the published
0.38677. On the demo every setting tried lowered mAP@100 (README).
"""

from landmark_jax import config_lib

# (image size, class weights, not-clean weight, what to carry from the previous stage)
STAGES = {
    "clean": (512, "inv_log", 1.0, None),
    "full": (512, "inv_log1p", 1.0, "model"),
    "full640": (640, "inv_log1p", 1.0, "all"),
    "full736": (736, "inv_log1p", 1.0, "all"),
    "notclean": (736, "inv_log1p", 0.5, "all"),
}


def get_config(arg: str = "clean"):
    """arg: a stage name from STAGES, optionally followed by ',smoke'."""
    stage, smoke = config_lib.parse_config_arg(arg, STAGES, "clean", "configs/glr2020_retrieval.py")
    image_size, class_weights, not_clean_weight, carry = STAGES[stage]

    config = config_lib.base_config("global")
    config.model.backbone = "efficientnet_b7"
    config.model.embedding_dim = 512
    config.model.pooling = "gap"
    config.model.neck = "dense_swish"
    # model(images) without training=True in the notebooks: see the docstring.
    config.model.batch_norm = "frozen"
    config.model.drop_connect_rate = 0.0
    config.image_size = image_size
    config.batch_size = 64
    config.total_steps = 100_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2_000
    config.val.every_steps = 10_000
    config.head.scale = "adacos_dynamic"
    config.head.margin_type = "none"
    config.head.init = "glorot_uniform"  # Keras add_variable default, see the docstring
    config.loss.class_weights = class_weights
    config.loss.not_clean_weight = not_clean_weight
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.momentum = 0.9
    config.optimizer.schedule = "inverse_time"
    config.optimizer.decay = 1e-5
    if carry:
        config.init.carry = carry
    # Retrieval: the index and test splits. Recognition (embedding the 4.1M
    # train images) only when --config.eval.recognition_solution scores it.
    config.eval.recognition_submission = False

    if smoke:
        config_lib.apply_smoke(config, image_size=32 if image_size == 512 else 48)
        config.optimizer.learning_rate = 0.05
    return config
