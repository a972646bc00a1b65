r"""Builds one of the project's TensorFlow Datasets (GLDv2, the demo, Revisited Oxford/Paris).

    python -m data_pipelines.build_dataset --dataset=gldv2/clean \
        --manual_dir=/mnt/gldv2 --data_dir=gs://BUCKET/tfds [--skip_bad_images] \
        [--num_workers=N] [--num_shards=N] [--val_fraction=F] [--seed=S] [--overwrite] \
        [--beam_pipeline_options="runner=DataflowRunner,project=P,..."]
    # what `make demo` runs
    python -m data_pipelines.build_dataset --dataset=landmark_demo \
        --manual_dir=demo_data/raw --data_dir=demo_data/tfds

A thin layer over TFDS's own `download_and_prepare`: `--dataset` is a TFDS
name (`gldv2/full`, `gldv2/clean`, `gldv2/gldv2x`, `landmark_demo`,
`revisited_oxford_paris/roxford5k`, ...), resolved by TFDS's registry once
the builder modules are imported, and the build lands in
`<data_dir>/<name>/<config>/<version>/`, which is what `config.data_dir`
names (or `data_dir` itself, when it holds that one build).

`--val_fraction` / `--seed` derive a config from the named one
(`gldv2/clean` with `--val_fraction=0.05 --seed=1` is built as config
`clean_val0.05_seed1`), so builds with other validation splits sit side by
side. With `--beam_pipeline_options` the images are encoded on Apache Beam
(e.g. Dataflow) instead of local worker processes. The program ends with the
build's summary (data_pipelines.describe_dataset.summarize).

Faults lose nothing:
- An existing build is reused as it is (TFDS's default) unless `--overwrite`.
  A rebuild is built beside it, in a temporary `incomplete.rebuild_*` folder
  of the config's folder; only once it is complete is the previous build
  moved aside (`<version>.previous_*`), the new one moved into its place and
  the previous one deleted. A rebuild that fails (a bad image, a full disk)
  or is killed leaves the previous build exactly as it was. (`tfds build
  --overwrite` deletes the previous build first.) A local move is one
  rename; in a bucket, which has no folders to rename, every object of both
  builds is copied and deleted once more, the metadata files last.
- One build of a config at a time: a build holds a lease
  (landmark_jax.runtime.file_lease; `<name>/<config>.build.lease` beside the config's
  folder) while it runs, and a second one fails at once naming the holder.
- Holding it, a build (or a run that reuses a build, when no build of
  that config is running) first deletes the `incomplete.*` folders of that
  config, which only a build that did not finish leaves (killed, or its
  machine lost): TFDS's temporaries, never a finished build. (A concurrent
  `tfds build` of the same config, which takes no lease, would lose its
  temporary folder: do not mix the two commands on one data dir.)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import flags

# The builder modules: importing them registers their datasets with TFDS.
from data_pipelines import (
    build_swap,
    demo_builder,
    describe_dataset,
    gldv2_builder,
    revisited_builder,
)
from landmark_jax.runtime import entry_point_errors, file_io, tensorflow_setup

_BUILDER_MODULES = (gldv2_builder, demo_builder, revisited_builder)
# The config fields --val_fraction and --seed override.
_OVERRIDABLE = ("val_fraction", "seed")


def project_builders() -> dict[str, type[tfds.core.DatasetBuilder]]:
    """The TFDS builder classes this project defines, by their TFDS name."""
    found = {}
    for module in _BUILDER_MODULES:
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, tfds.core.DatasetBuilder)
                and value.__module__ == module.__name__
            ):
                found[value.name] = value
    return found


def dataset_names() -> list[str]:
    """Every `name/config` this program builds (`name` alone for one-config builders)."""
    names = []
    for name, cls in sorted(project_builders().items()):
        configs = [c.name for c in cls.BUILDER_CONFIGS]
        names += [f"{name}/{c}" for c in configs] if len(configs) > 1 else [name]
    return names


def derived_config(
    config: tfds.core.BuilderConfig, val_fraction: float | None, seed: int | None
) -> tfds.core.BuilderConfig:
    """The config with another validation split, under a name that says so.

    Args:
      config: a named config of the builder.
      val_fraction: the new val_fraction, or None to keep the config's.
      seed: the new seed, or None to keep the config's.

    Returns:
      `config` itself when nothing changes, else a copy named e.g.
      `clean_val0.05_seed1` (only the changed fields appear in the name).

    Raises:
      ValueError: the config has no such field, or a value out of range.
    """
    wanted = {"val_fraction": val_fraction, "seed": seed}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    fields = (
        {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else ()
    )
    lacking = [k for k in wanted if k not in fields]
    if lacking:
        raise ValueError(
            f"--{lacking[0]}: config {config.name!r} has no {lacking[0]} to override "
            f"(its builder has no validation split)"
        )
    if "val_fraction" in wanted and not 0.0 <= wanted["val_fraction"] <= 1.0:
        raise ValueError(f"--val_fraction={wanted['val_fraction']}: must be in [0, 1]")
    if "seed" in wanted and wanted["seed"] < 0:
        raise ValueError(f"--seed={wanted['seed']}: must be >= 0")
    changed = {k: v for k, v in wanted.items() if getattr(config, k) != v}
    if not changed:
        return config
    suffix = "".join(
        f"_val{changed['val_fraction']:g}" if k == "val_fraction" else f"_seed{changed['seed']}"
        for k in _OVERRIDABLE
        if k in changed
    )
    settings = ", ".join(f"{k}={v}" for k, v in changed.items())
    return dataclasses.replace(
        config,
        name=f"{config.name}{suffix}",
        description=f"{config.description} ({settings})",
        **changed,
    )


def make_builder(
    dataset: str,
    data_dir: str,
    *,
    val_fraction: float | None = None,
    seed: int | None = None,
    skip_bad_images: bool = False,
    num_workers: int | None = None,
) -> tfds.core.DatasetBuilder:
    """The TFDS builder of one of this project's data sets.

    Args:
      dataset: a TFDS name, `name[/config][:version]` (see dataset_names).
      data_dir: the TFDS data dir the build goes under.
      val_fraction: override the config's validation fraction (a derived
        config, see derived_config).
      seed: override the config's validation seed.
      skip_bad_images: the builder's skip_bad_images option (GLDv2, demo).
      num_workers: the builder's worker processes (default: its own).

    Returns:
      The builder, through tfds.builder.

    Raises:
      ValueError: an unknown data set or config (listing the valid ones), an
        option the builder does not take, or a bad override.
    """
    try:
        name, kwargs = tfds.core.naming.parse_builder_name_kwargs(dataset)
    except ValueError as e:
        raise ValueError(f"--dataset={dataset!r}: {e}; expected one of {dataset_names()}") from None
    builders = project_builders()
    cls = builders.get(str(name))
    if cls is None:
        raise ValueError(
            f"--dataset={dataset!r}: unknown data set; expected one of {dataset_names()}"
        )
    config = kwargs.pop("config", None)
    if cls.BUILDER_CONFIGS:
        config = config or cls.default_builder_config.name
        if config not in cls.builder_configs:
            raise ValueError(
                f"--dataset={dataset!r}: {name} has no config {config!r}; expected one of "
                f"{[f'{name}/{c.name}' for c in cls.BUILDER_CONFIGS]}"
            )
        config = derived_config(cls.builder_configs[config], val_fraction, seed)
        kwargs["config"] = config
    elif val_fraction is not None or seed is not None:
        raise ValueError(f"--dataset={dataset!r} has no config to override")
    options = {"skip_bad_images": skip_bad_images or None, "num_workers": num_workers}
    takes = inspect.signature(cls.__init__).parameters
    for option, value in options.items():
        if value is None:
            continue
        if option not in takes:
            raise ValueError(f"--{option}: {name} has no such option")
        kwargs[option] = value
    return tfds.builder(str(name), data_dir=data_dir, **kwargs)


def beam_options(spec: str):
    """Apache Beam's PipelineOptions from `k=v,k=v` (as `tfds build --beam_pipeline_options`).

    Raises:
      RuntimeError: Apache Beam is not installed.
    """
    try:
        from apache_beam.options import pipeline_options
    except ImportError as e:
        raise RuntimeError(
            f"--beam_pipeline_options needs Apache Beam ({e}): pip install apache-beam "
            "(the project's extra: pip install -e '.[beam]'; for Dataflow apache-beam[gcp])"
        ) from None
    return pipeline_options.PipelineOptions(
        flags=[f"--{option.strip()}" for option in spec.split(",") if option.strip()]
    )


def build(
    dataset: str,
    data_dir: str,
    *,
    manual_dir: str | None = None,
    num_shards: int | None = None,
    overwrite: bool = False,
    beam_pipeline_options: str | None = None,
    **builder_options,
) -> tuple[tfds.core.DatasetBuilder, bool]:
    """Builds a data set, or reuses its existing build (see the module docstring).

    Args:
      dataset: the TFDS name (make_builder).
      data_dir: the TFDS data dir.
      manual_dir: the raw data the builder reads (TFDS's manual dir).
      num_shards: shard files per split (default: TFDS sizes them).
      overwrite: build again and replace an existing build once the new one
        is complete.
      beam_pipeline_options: build on Apache Beam with these options.
      **builder_options: make_builder's val_fraction, seed,
        skip_bad_images, num_workers.

    Returns:
      (the builder of the finished build, True if an existing build was
      reused).

    Raises:
      ValueError: make_builder's errors, num_shards < 1, a split with fewer
        examples than num_shards, a manual_dir that is not a folder, and the
        builders' own errors (bad input files, named).
      RuntimeError: Beam options without Apache Beam; another build of the
        same config running (file_lease.LeaseHeld, naming it) or finishing
        first into the same folder.
    """
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"--num_shards={num_shards}: must be >= 1")
    if manual_dir and not file_io.isdir(manual_dir):
        raise ValueError(f"--manual_dir={manual_dir}: no such folder")
    options = beam_options(beam_pipeline_options) if beam_pipeline_options else None
    builder = make_builder(dataset, data_dir, **builder_options)
    final = os.fspath(builder.data_dir)
    if builder.is_prepared() and not overwrite:
        build_swap.tidy_when_idle(dataset, final)
        return builder, True
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        num_shards=num_shards,
        beam_options=options,
        # TFDS never deletes a build here: a rebuild goes beside it.
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
    )
    with build_swap.build_lease(dataset, final):
        # A builder opened now: another build may have finished meanwhile
        # (and one opened over a build holds that build's state).
        builder = make_builder(dataset, data_dir, **builder_options)
        build_swap.remove_unfinished(file_io.dirname(final))
        if builder.is_prepared() and not overwrite:
            return builder, True
        if not builder.is_prepared():
            _prepare(builder, config, data_dir, num_shards)
            return builder, False

        def build_into(staging: str) -> str:
            staged = make_builder(dataset, staging, **builder_options)
            _prepare(staged, config, data_dir, num_shards)
            return os.fspath(staged.data_dir)

        build_swap.rebuild_beside(final, build_into)
        return make_builder(dataset, data_dir, **builder_options), False


def _prepare(
    builder: tfds.core.DatasetBuilder,
    config: tfds.download.DownloadConfig,
    data_dir: str,
    num_shards: int | None,
) -> None:
    """builder.download_and_prepare, with TFDS's errors about our input made ours."""
    try:
        # The download dir of the data dir, also for a staged rebuild: the
        # demo builder keeps the raw tree it generates there.
        builder.download_and_prepare(
            download_dir=file_io.join(data_dir, "downloads"), download_config=config
        )
    except AssertionError as e:
        # TFDS's own check, for builders that do not check num_shards before
        # encoding (gldv2_builder does): "num_examples (3) < number_of_shards (4)".
        if num_shards and "number_of_shards" in str(e):
            raise ValueError(f"--num_shards={num_shards}: a split is smaller ({e})") from None
        raise
    except FileExistsError as e:
        # TFDS renames its temporary folder into place at the end; another
        # build that takes no lease (`tfds build`) got there first.
        raise RuntimeError(
            f"{builder.data_dir}: another build finished there while this one ran (two "
            f"builds into one data dir at once); that build is kept, this one discarded ({e})"
        ) from None


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("dataset", None, "TFDS name: gldv2/full|clean|gldv2x, landmark_demo, ...")
    flags.DEFINE_string("manual_dir", None, "The raw data (GLDv2: CSVs and image trees).")
    flags.DEFINE_string("data_dir", None, "TFDS data dir: the build goes below it (local, gs://).")
    flags.DEFINE_bool("skip_bad_images", False, "Skip and list missing/undecodable images.")
    flags.DEFINE_integer("num_workers", None, "Encoding processes (default: one per core).")
    flags.DEFINE_integer("num_shards", None, "Shard files per split (default: TFDS's sizing).")
    flags.DEFINE_float("val_fraction", None, "Override the config's validation fraction.")
    flags.DEFINE_integer("seed", None, "Override the config's validation seed.")
    flags.DEFINE_bool(
        "overwrite", False, "Build again; the new build replaces the existing one once complete."
    )
    flags.DEFINE_string(
        "beam_pipeline_options", None, "Build on Apache Beam: comma-separated k=v options."
    )


def main(argv: Sequence[str]) -> None:
    entry_point_errors.refuse_arguments(argv)
    tensorflow_setup.hide_accelerators()
    builder, reused = build(
        FLAGS.dataset,
        FLAGS.data_dir,
        manual_dir=FLAGS.manual_dir,
        num_shards=FLAGS.num_shards,
        overwrite=FLAGS.overwrite,
        beam_pipeline_options=FLAGS.beam_pipeline_options,
        val_fraction=FLAGS.val_fraction,
        seed=FLAGS.seed,
        skip_bad_images=FLAGS.skip_bad_images,
        num_workers=FLAGS.num_workers,
    )
    if reused:
        print(
            f"{builder.data_dir}: already built; reusing it as it is "
            "(pass --overwrite to build it again)"
        )
    print(describe_dataset.summarize(os.fspath(builder.data_dir)))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["dataset", "data_dir"])
    entry_point_errors.run(main)
