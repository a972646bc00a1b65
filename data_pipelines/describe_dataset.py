r"""Prints a summary of a built data folder, read back through the input pipeline.

    python -m data_pipelines.describe_dataset --data_dir=demo_data/tfrecords

Reports each split's examples and files, the classes and their size
distribution, and one training batch as the trainer would receive it (global
arrays on the device mesh), so a broken folder shows up here rather than at
the first training step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import app, flags

from landmark_jax import (
    data_format,
    entry_point_errors,
    file_io,
    input_pipeline,
    sharding,
    tensorflow_setup,
)


def describe(data_dir: str, image_size: int = 64, batch_size: int | None = None) -> str:
    """A human-readable summary of a data folder.

    Args:
      data_dir: the builder's output folder.
      image_size: image side for the sample batch.
      batch_size: global batch of the sample (default: one per device).

    Returns:
      The summary text.

    Raises:
      DataFormatError: the folder is incomplete or inconsistent.
    """
    import jax

    info = file_io.read_json(file_io.join(data_dir, data_format.DATASET_INFO))
    lines = [f"data_dir: {data_dir}"]
    for name in ("train", "val", "index", "test"):
        if name not in info["splits"]:
            continue
        split = data_format.read_split_info(data_dir, name)
        clean = info["splits"][name].get("num_clean")
        extra = f", {clean:,d} clean" if split.labeled and clean is not None else ""
        lines.append(
            f"  {name:5s}: {split.num_examples:>9,d} examples in {len(split.files)} files{extra}"
        )
    if "train" in info["splits"]:
        label_map = data_format.read_label_map(data_dir)
        counts, train_val = label_map.counts, label_map.train_val_counts
        lines.append(
            f"  classes: {label_map.num_classes:,d} (train images per class: min {counts.min()}, "
            f"median {int(np.median(counts))}, max {counts.max()})"
        )
        # The class weights and margins use these (losses.per_class_constants).
        lines.append(
            f"  train + val images per class: min {train_val.min()}, "
            f"median {int(np.median(train_val))}, max {train_val.max()}"
        )
        mesh = sharding.create_mesh()
        batch_size = batch_size or mesh.devices.size
        batch = next(
            input_pipeline.train_iterator(
                data_dir, mesh=mesh, global_batch_size=batch_size, image_size=image_size, seed=0
            )
        )
        image, labels = batch["image"], np.asarray(batch["label"]).tolist()
        lines.append(
            f"  train batch on {mesh.devices.size} {jax.devices()[0].platform} device(s): "
            f"image {image.dtype}{list(image.shape)}, labels {labels}, "
            f"is_clean {np.asarray(batch['is_clean']).tolist()}"
        )
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("data_dir", None, "Output folder of data_pipelines.gldv2_to_tfrecord.")
    flags.DEFINE_integer("image_size", 64, "Image side of the sample batch.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tensorflow_setup.hide_accelerators()
    print(describe(FLAGS.data_dir, FLAGS.image_size))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["data_dir"])
    entry_point_errors.run(main)
