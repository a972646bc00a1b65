"""The recipes of experiments/tpu_vm/tpu_job.py and the job they make.

Stage, Recipe and RECIPES (each recipe's chain of training stages and its
evaluation), ENSEMBLE_CONFIG (GLR2020's ensembles), the TPU slice's shape
from its accelerator type (num_hosts, num_devices), and Job: everything the
job's commands are built from.
"""

from __future__ import annotations

import dataclasses
import os
import re

# The clone this script is in: the config files the workers will read are
# read here from the same paths (the dry run's checks).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training run of a recipe: its config arg and the data folder it reads."""

    name: str
    config: str  # configs/FILE.py:ARG
    data: str  # a key of Job.data: 'clean', 'full' or 'x'


@dataclasses.dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    evaluation: str  # the config `evaluate` reads for the last stage
    # Whether the evaluation labels the test images (kNN against the train
    # split: embedding every train image) and writes recognition_submission.csv
    # without a recognition solution: GLR2021 was the recognition competition,
    # GLR2020 the retrieval one (its 4.1M train images would be embedded for
    # nothing). The recipe's config says the same; the job's command states it.
    recognition_submission: bool


RECIPES: dict[str, Recipe] = {
    "glr2020": Recipe(
        stages=(
            Stage("clean", "configs/glr2020_retrieval.py:clean", "clean"),
            Stage("full", "configs/glr2020_retrieval.py:full", "full"),
            Stage("full640", "configs/glr2020_retrieval.py:full640", "full"),
            Stage("full736", "configs/glr2020_retrieval.py:full736", "full"),
            Stage("notclean", "configs/glr2020_retrieval.py:notclean", "full"),
        ),
        evaluation="configs/glr2020_retrieval.py:notclean",
        recognition_submission=False,
    ),
    "glr2021": Recipe(
        stages=(
            Stage("step1", "configs/glr2021_dolg.py:step1", "clean"),
            Stage("step2", "configs/glr2021_dolg.py:step2", "x"),
            Stage("step3", "configs/glr2021_dolg.py:step3", "x"),
        ),
        evaluation="configs/glr2021_dolg.py:step3",
        recognition_submission=True,
    ),
}
# GLR2020's ensembles (retrieval only: its eval.train_split is '').
ENSEMBLE_CONFIG = "configs/glr2020_ensemble.py"


def num_hosts(accelerator_type: str) -> int:
    """Workers (hosts) of a TPU slice, from its accelerator type.

    v2/v3/v4/v5p types count TensorCores, 8 per host (v4-8: 1 host, v4-32: 4);
    v5litepod/v6e types count chips: up to 8 on one host, else 4 per host.

    Raises:
      ValueError: an accelerator type of another form, named.
    """
    family, count = _accelerator(accelerator_type)
    if family in ("v5litepod", "v6e"):
        return 1 if count <= 8 else count // 4
    return max(1, count // 8)


def num_devices(accelerator_type: str) -> int:
    """JAX devices of a TPU slice (what a global batch must be a multiple of).

    v2/v3: one per TensorCore (the type's count); v4/v5p: one per chip (two
    TensorCores as one megacore device, so half the count); v5litepod/v6e:
    one per chip (the count).

    Raises:
      ValueError: an accelerator type of another form, named.
    """
    family, count = _accelerator(accelerator_type)
    return max(1, count // 2) if family in ("v4", "v5p") else count


def _accelerator(accelerator_type: str) -> tuple[str, int]:
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        raise ValueError(
            f"--accelerator_type={accelerator_type!r}: expected e.g. v3-8, v4-32, v5p-16, "
            "v5litepod-8 or v6e-16"
        )
    return match.group(1), int(match.group(2))


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything the job's commands are built from (the command-line flags)."""

    recipe: str
    tpu: str
    zone: str
    accelerator_type: str
    root: str
    data: dict[str, str]
    backbone_weights: str
    repo: str
    ref: str = "main"
    version: str = "tpu-ubuntu2204-base"
    spot: bool = False
    queued: bool = False
    retrieval_solution: str = ""
    recognition_solution: str = ""
    members: dict[str, str] = dataclasses.field(default_factory=dict)
    ensemble_variant: str = "released"  # the arg of ENSEMBLE_CONFIG the members belong to

    def workdir(self, stage: str) -> str:
        return f"{self.root.rstrip('/')}/{self.recipe}/{stage}"
