r"""GLR2020 retrieval, 1st place: the ensemble, evaluated on GLDv2 index/test.

    python -m landmark_jax.evaluate --config=configs/glr2020_ensemble.py \
        --workdir=runs/ensemble --config.data_dir=DATA_FULL \
        --config.eval.retrieval_solution=retrieval_solution.csv \
        --config.eval.ensemble.b7_640.workdir=runs/b7/notclean640 \
        --config.eval.ensemble.b6_640.workdir=runs/b6/notclean640 \
        --config.eval.ensemble.b7_640_second.workdir=runs/b7_v2/notclean640 \
        --config.eval.ensemble.b7_512.workdir=runs/b7_v1/notclean512

writes runs/ensemble/eval/ (metrics.json with mAP@100, retrieval_submission.csv,
gallery.png). Each member is a GLR2020 chain of configs/glr2020_retrieval.py
(B6: `--config.model.backbone=efficientnet_b6`), rebuilt from its own
config.json. Expected: the published private mAP@100 0.38677 for the
released members; a member a user has not trained leaves `workdir` empty,
and the evaluation stops naming it.

As released (export_model.ipynb, see ensemble.GLR2020_RELEASED): four
members, each descriptor L2-normalised, multiplied by its weight and
concatenated (4 x 512 = 2048-d; blocks in member-name order, which
changes no similarity), then a k=100 nearest-neighbour search:

    member          weight  fed    released checkpoint
    b7_640          1.0     640    eff7_640_notclean_0.5_1.1411
    b6_640          0.8     640    eff6_640_notclean_0.5_1.1931
    b7_640_second   0.55    640    eff7_512_ver2_10293_NotClean_0.5_640 (epoch 44)
    b7_512          0.5     512    eff7_512_ver1_notclean0.5_1.2580

Every member is fed the square resize at its size (`tf.image.resize`, aspect
not kept), without flip: the export's preprocessing. The names say what each
was trained as: the not-clean-at-half-weight stage at 640 px (B7, B6), or at
512 px (b7_512). The second B7 (`eff7_512_ver2_10293_NotClean_0.5_640`) reads
as a second B7 run at 512 px whose not-clean stage ran at 640, the size it is
fed; what 10293 means, and whether that run went through the 640 px full
stage, is not known (its training notebooks were not released). The recipe in
configs/glr2020_retrieval.py runs that stage after 736 px instead: for these
members run `:notclean` with `--config.image_size=640` (or 512) after the
stage of that size.

`:article` is the summary article's variant instead: one B7 (1.0), one B6
(0.8) and two B5 runs (0.5 each), every member at its own training size (the
article names no sizes); its members are b7, b6, b5_a and b5_b.

Recognition is off (`eval.train_split=''`): GLR2020 was the retrieval
competition, and embedding the 4.1M train images is an evaluation of its own.
Append `,smoke` (`:released,smoke`) for the same members at 48 / 32 px with
exact search, for the tests and a quick check of member workdirs.
"""

import ml_collections

from landmark_jax import config_lib
from landmark_jax.retrieval import ensemble

# (member, weight, image size fed; None: the member's own)
VARIANTS = {
    "released": tuple((name, w, size) for name, w, size, _ in ensemble.GLR2020_RELEASED),
    "article": (("b7", 1.0, None), ("b6", 0.8, None), ("b5_a", 0.5, None), ("b5_b", 0.5, None)),
}
_SMOKE_SIZES = {640: 48, 512: 32}


def get_config(arg: str = "released"):
    """arg: 'released' or 'article', optionally followed by ',smoke'."""
    variant, smoke = config_lib.parse_config_arg(
        arg, VARIANTS, "released", "configs/glr2020_ensemble.py"
    )
    config = config_lib.base_config("global")
    config.eval.train_split = ""
    config.eval.resize = "square"
    config.eval.flip = False
    config.eval.scales = (1.0,)
    config.eval.k = 100
    # Named members, so a command line sets one member's workdir.
    del config.eval["ensemble"]
    config.eval.ensemble = ml_collections.ConfigDict(
        {
            name: {
                "workdir": "",
                "weight": weight,
                "image_size": _SMOKE_SIZES.get(size) if smoke else size,
            }
            for name, weight, size in VARIANTS[variant]
        }
    )
    if smoke:
        config.data_dir = "demo_data/tfds"
        config.eval.knn_backend = "exact"
        config.eval.gallery_queries = 2
    return config
