"""The tests' TFDS builds: building the demo and GLDv2 builders in this
process, and reading a build with TFDS's own reader (the independent
reference for what the project's input pipeline reads)."""

from __future__ import annotations

import tensorflow_datasets as tfds


def tfds_order(build: str, split: str) -> list[str]:
    """A split's ids in file order (shards in order, records in order)."""
    ds = tfds.builder_from_directory(build).as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    return [i.decode() for i in ds.map(lambda ex: ex["id"]).as_numpy_iterator()]


def build_tfds(
    manual_dir: str, data_dir: str, *, name: str = "default", num_shards: int = 2, **config
) -> str:
    """Builds a GLDv2-layout tree with the TFDS builders, in this process.

    name 'default' is the demo builder (data_pipelines.demo_builder); any
    other name a GLDv2 build with a custom config of that name (config:
    Gldv2Config fields). Returns the build folder.
    """
    import tensorflow_datasets as tfds

    from data_pipelines import demo_builder, gldv2_builder

    if name == "default":
        builder = demo_builder.LandmarkDemo(data_dir=data_dir, num_workers=1)
    else:
        cfg = gldv2_builder.Gldv2Config(name=name, **config)
        builder = gldv2_builder.Gldv2(config=cfg, data_dir=data_dir, num_workers=1)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, num_shards=num_shards)
    )
    return str(builder.data_dir)
