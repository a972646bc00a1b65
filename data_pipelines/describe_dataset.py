r"""Prints a summary of a TensorFlow Datasets build, read back as training reads it.

    python -m data_pipelines.describe_dataset --data_dir=demo_data/tfds

`--data_dir` is a build folder (`<data dir>/gldv2/clean/1.0.0`) or a folder
above exactly one build (landmark_jax.data.data_format.find_build). Reports each
split's examples and shard files, the classes and their size distribution,
the clean examples and the images the build skipped (from the builders'
metadata), and one training batch as the trainer would receive it (global
arrays on the device mesh), so a broken build shows up here rather than at
the first training step. `summarize` (without the batch) is also what
data_pipelines.build_dataset prints after a build.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import flags

from landmark_jax.data import data_format
from landmark_jax.runtime import entry_point_errors, tensorflow_setup

# Splits in the order a summary lists them; any other split follows, sorted.
_SPLIT_ORDER = ("train", "val", "index", "test", "nonlandmark")
# Skipped images named in a summary (the metadata lists them all).
_SKIPPED_SHOWN = 5


def _split_names(names) -> list[str]:
    known = [n for n in _SPLIT_ORDER if n in names]
    return known + sorted(n for n in names if n not in _SPLIT_ORDER)


def _spread(values: np.ndarray) -> str:
    return f"min {values.min():,d}, median {int(np.median(values)):,d}, max {values.max():,d}"


def summarize(data_dir: str) -> str:
    """A human-readable summary of a build, from its TFDS metadata alone.

    Args:
      data_dir: the build, or a folder above exactly one build.

    Returns:
      The summary text: the build folder and dataset, per split its examples
      and shard files (train and val: how many are clean), the classes and
      images per class, the skipped images, and for a Revisited build its
      queries.

    Raises:
      DataFormatError: not one TFDS build, shard files missing, or metadata
        that disagrees with the splits (data_format's checks).
    """
    build = data_format.find_build(data_dir)
    builder = data_format.open_build(build)
    metadata = builder.info.metadata or {}
    label_map = data_format.read_label_map(build) if data_format.CLASS_COUNTS in metadata else None
    clean = {}
    if label_map is not None:
        clean["train"] = int(label_map.clean_counts.sum())
        clean["val"] = int(label_map.train_val_clean_counts.sum()) - clean["train"]
    lines = [f"build: {build} ({builder.info.full_name})"]
    names = _split_names(builder.info.splits.keys())
    width = max([11, *map(len, names)])  # 11: 'nonlandmark'
    for name in names:
        split = data_format.read_split_info(build, name)
        extra = f", {clean[name]:,d} clean" if name in clean else ""
        lines.append(
            f"  {name:{width}s}: {split.num_examples:>11,d} examples in "
            f"{len(split.files):,d} shard file{'s' if len(split.files) != 1 else ''}{extra}"
        )
    if data_format.LABEL in builder.info.features.keys():  # noqa: SIM118 (not a dict)
        line = f"  classes: {data_format.read_num_classes(build):,d}"
        if label_map is not None:
            # The class weights and margins use the train + val counts
            # (losses.per_class_constants).
            line += (
                f" (train images per class: {_spread(label_map.counts)}; "
                f"train + val: {_spread(label_map.train_val_counts)})"
            )
        lines.append(line)
    skipped = metadata.get(data_format.SKIPPED_IMAGES)
    if skipped is not None:
        line = f"  skipped images: {len(skipped):,d}"
        if skipped:
            shown = "; ".join(f"{i} ({path}: {why})" for i, path, why in skipped[:_SKIPPED_SHOWN])
            more = (
                f"; and {len(skipped) - _SKIPPED_SHOWN:,d} more"
                if len(skipped) > _SKIPPED_SHOWN
                else ""
            )
            line += f" (all in metadata.json '{data_format.SKIPPED_IMAGES}'): {shown}{more}"
        lines.append(line)
    gnd = metadata.get(data_format.REVISITED_GND)
    if isinstance(gnd, dict) and "qimlist" in gnd:
        lines.append(
            f"  ground truth: {len(gnd['qimlist']):,d} queries over "
            f"{len(gnd.get('imlist', [])):,d} database images"
        )
    return "\n".join(lines)


def describe(data_dir: str, image_size: int = 64, batch_size: int | None = None) -> str:
    """`summarize`, plus one training batch read through the input pipeline.

    Args:
      data_dir: the build, or a folder above exactly one build.
      image_size: image side for the sample batch.
      batch_size: global batch of the sample (default: one per device).

    Returns:
      The summary text.

    Raises:
      DataFormatError: the build is incomplete or inconsistent.
    """
    # Imported here: summarize (what build_dataset prints) needs neither JAX
    # nor the input pipeline.
    import jax

    from landmark_jax.data import input_pipeline
    from landmark_jax.runtime import sharding

    text = summarize(data_dir)
    build = data_format.find_build(data_dir)
    if "train" not in data_format.open_build(build).info.splits:
        return text
    mesh = sharding.create_mesh()
    batch_size = batch_size or mesh.devices.size
    batch = next(
        input_pipeline.train_iterator(
            build, mesh=mesh, global_batch_size=batch_size, image_size=image_size, seed=0
        )
    )
    image, labels = batch["image"], np.asarray(batch["label"]).tolist()
    return (
        f"{text}\n  train batch on {mesh.devices.size} {jax.devices()[0].platform} device(s): "
        f"image {image.dtype}{list(image.shape)}, labels {labels}, "
        f"is_clean {np.asarray(batch['is_clean']).tolist()}"
    )


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string(
        "data_dir", None, "A TFDS build (data_pipelines.build_dataset), or a folder above one."
    )
    flags.DEFINE_integer("image_size", 64, "Image side of the sample batch.")


def main(argv: Sequence[str]) -> None:
    entry_point_errors.refuse_arguments(argv)
    tensorflow_setup.hide_accelerators()
    print(describe(FLAGS.data_dir, FLAGS.image_size))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["data_dir"])
    entry_point_errors.run(main)
