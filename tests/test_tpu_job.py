"""experiments/tpu_vm/tpu_job.py: the commands of a TPU VM batch job, and its retries."""

import dataclasses
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

from config_files import REPO, load_config

_spec = importlib.util.spec_from_file_location(
    "tpu_job", os.path.join(REPO, "experiments", "tpu_vm", "tpu_job.py")
)
tpu_job = importlib.util.module_from_spec(_spec)
sys.modules["tpu_job"] = tpu_job  # dataclasses look their module up by name
_spec.loader.exec_module(tpu_job)

ROOT = "gs://bucket/runs"
FLAGS = [
    "--tpu=lm",
    "--zone=us-central2-b",
    "--repo=https://example.org/landmark_jax.git",
    f"--root={ROOT}",
    "--data_clean=gs://bucket/clean",
    "--data_full=gs://bucket/full",
    "--data_x=gs://bucket/x",
    "--backbone_weights=gs://bucket/weights/b7",
]


def _job(recipe="glr2020", accelerator_type="v4-32", **kwargs):
    data = {"clean": "gs://bucket/clean", "full": "gs://bucket/full", "x": "gs://bucket/x"}
    return tpu_job.Job(
        recipe=recipe,
        tpu="lm",
        zone="us-central2-b",
        accelerator_type=accelerator_type,
        root=ROOT,
        data=data,
        backbone_weights="gs://bucket/weights/b7",
        repo="https://example.org/landmark_jax.git",
        **kwargs,
    )


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return values[0] if values else None


@pytest.mark.parametrize(
    ("kind", "hosts"),
    [("v3-8", 1), ("v3-32", 4), ("v4-8", 1), ("v4-32", 4), ("v5p-16", 2)]
    + [("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-64", 16)],
)
def test_num_hosts(kind, hosts):
    assert tpu_job.num_hosts(kind) == hosts


def test_num_hosts_names_a_bad_type():
    with pytest.raises(ValueError, match="--accelerator_type='tpu-8'"):
        tpu_job.num_hosts("tpu-8")


@pytest.mark.parametrize("recipe", sorted(tpu_job.RECIPES))
def test_stages_chain_their_checkpoints_and_read_their_data(recipe):
    job = _job(recipe)
    stages = tpu_job.RECIPES[recipe].stages
    previous = None
    for i, stage in enumerate(stages):
        argv = tpu_job.train_argv(job, i)
        assert argv[:3] == [".venv/bin/python", "-m", "landmark_jax.train"]
        assert _flag(argv, "workdir") == f"{ROOT}/{recipe}/{stage.name}"
        assert _flag(argv, "config.data_dir") == job.data[stage.data]
        if previous is None:  # the first stage starts from the ImageNet weights
            assert _flag(argv, "config.init.backbone") == job.backbone_weights
            assert _flag(argv, "config.init.checkpoint") is None
        else:
            assert _flag(argv, "config.init.checkpoint") == previous
        assert "--tpu_pod" in argv  # v4-32: 4 hosts
        # The config arg names a real stage of a real config.
        name, arg = _flag(argv, "config").removeprefix("configs/").split(".py:")
        load_config(name, arg)
        previous = _flag(argv, "workdir")
    assert [s.data for s in stages][0] == "clean"
    evaluate = tpu_job.evaluate_argv(job)
    assert _flag(evaluate, "workdir") == previous  # the last stage
    assert "--tpu_pod" not in tpu_job.train_argv(_job(recipe, "v4-8"), 0)  # one host


def test_dry_run_prints_every_command_in_order():
    result = subprocess.run(
        [sys.executable, "experiments/tpu_vm/tpu_job.py", "--recipe=glr2020", "--dry_run"]
        + ["--accelerator_type=v4-32", "--spot", *FLAGS]
        + ["--retrieval_solution=gs://bucket/sol.csv"]
        + [f"--member={n}={ROOT}/{n}" for n in ("b7_640", "b6_640", "b7_640_second", "b7_512")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    create, install, *stages, evaluate = lines
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "--accelerator-type=v4-32" in create and "--spot" in create
    for line in [install, *stages, evaluate]:
        assert line[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
        assert "--worker=all" in line and line[-1].startswith("--command=")
    assert "pip install" in install[-1] and "git clone" in install[-1]
    names = ["clean", "full", "full640", "full736", "notclean"]
    for name, line in zip(names, stages, strict=True):
        script = line[-1]
        assert f"--workdir={ROOT}/glr2020/{name}" in script
        # Logs in the bucket; only the worker's host name is left to the shell.
        assert f'{ROOT}/glr2020/logs/{name}-"$(hostname).log"' in script
    script = evaluate[-1]
    assert "landmark_jax.evaluate" in script and "configs/glr2020_ensemble.py" in script
    assert f"--config.eval.ensemble.b7_512.workdir={ROOT}/b7_512" in script
    assert "--config.eval.retrieval_solution=gs://bucket/sol.csv" in script


def test_a_recipe_without_its_data_folder_is_refused():
    flags = [f for f in FLAGS if not f.startswith("--data_full")]
    result = subprocess.run(
        [sys.executable, "experiments/tpu_vm/tpu_job.py", "--recipe=glr2020", "--dry_run", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "reads --data_full: set it" in result.stderr


class FakeCloud:
    """Answers gcloud commands: the TPU's state, and scripted failures of steps."""

    def __init__(self, states, failures):
        self.states, self.failures, self.log = list(states), dict(failures), []

    def __call__(self, argv):
        kind = argv[4] if argv[3] == "tpu-vm" else argv[3]
        step = kind
        if kind == "ssh":
            script = argv[-1]
            step = (
                "install" if "pip install" in script else script.split("--workdir=")[1].split()[0]
            )
        self.log.append(step)
        rc, out = 0, ""
        if kind == "describe":
            out = self.states.pop(0)
            rc = 1 if out == "NOT_FOUND" else 0
        elif self.failures.get(step, 0) > 0:
            self.failures[step] -= 1
            rc = 255
        return subprocess.CompletedProcess(argv, rc, stdout=out)


def test_a_preempted_tpu_is_created_again_and_the_stage_resumes():
    job = _job("glr2021", "v4-8", solution="gs://bucket/recognition_solution.csv")
    step2 = f"{ROOT}/glr2021/step2"
    cloud = FakeCloud(["NOT_FOUND", "PREEMPTED"], {step2: 1})
    tpu_job.run_job(job, run=cloud, wait_seconds=0)
    assert cloud.log == [
        "describe",
        "create",
        "install",
        f"{ROOT}/glr2021/step1",
        step2,  # fails: the TPU was preempted
        "describe",
        "delete",
        "create",
        "install",
        step2,  # the same command again: the stage resumes from its checkpoint
        f"{ROOT}/glr2021/step3",
        f"{ROOT}/glr2021/step3",  # the evaluation reads the last stage's workdir
    ]


def test_a_step_that_keeps_failing_stops_the_job_naming_it():
    job = _job("glr2021", "v4-8")
    step1 = f"{ROOT}/glr2021/step1"
    cloud = FakeCloud(["READY", "READY", "READY"], {step1: 5})
    with pytest.raises(RuntimeError, match="step 'step1' failed 3 times"):
        tpu_job.run_job(job, run=cloud, wait_seconds=0)
    assert cloud.log.count(step1) == 3 and "create" not in cloud.log


def test_install_script_runs_on_a_worker_and_again(tmp_path):
    """The worker script under bash, with git, curl and uv replaced by
    stand-ins that record their arguments: a first run clones, installs uv
    and makes the venv; a second updates the clone and reuses both."""
    bin_dir, home, calls = tmp_path / "bin", tmp_path / "home", tmp_path / "calls"
    bin_dir.mkdir()
    home.mkdir()
    # uv's installer (what curl fetches and sh runs) puts uv in ~/.local/bin.
    uv = tmp_path / "uv"
    fakes = {
        "git": 'if [ "$1" = clone ]; then mkdir -p "${@: -1}"; fi',
        "curl": f'echo "mkdir -p $HOME/.local/bin; cp {uv} $HOME/.local/bin/uv"',
        uv: 'if [ "$1" = venv ]; then mkdir -p "${@: -1}/bin"; '
        'touch "${@: -1}/bin/python"; chmod +x "${@: -1}/bin/python"; fi',
    }
    for name, body in fakes.items():
        path = bin_dir / name if isinstance(name, str) else name
        path.write_text(f'#!/bin/bash\necho {path.name} "$*" >> {calls}\n{body}\n')
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)}
    script = tpu_job.install_script(_job())
    for _ in range(2):
        subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30)
    lines = calls.read_text().splitlines()
    src = tpu_job.SOURCE_DIR
    assert lines[0].startswith("git clone -q --depth 1 --branch main https://example.org/")
    assert lines[1].startswith("curl ")  # uv installed once, by its installer
    assert lines[2] == f"uv venv -q --python 3.12 {src}/.venv"
    assert lines[3] == f"uv pip install -q --python {src}/.venv/bin/python -e {src} " + (
        "jax[tpu]>=0.10.0,<0.13"
    )
    # Second run: fetch and check out the ref; uv and the venv are kept.
    assert lines[4:] == [
        f"git -C {src} fetch -q --depth 1 origin main",
        f"git -C {src} checkout -q --force FETCH_HEAD",
        lines[3],
    ]


def test_user_values_cannot_inject_commands_into_the_worker_script(tmp_path):
    """A stage's worker script under bash, with python, gsutil and hostname
    replaced by stand-ins that record their arguments: a --root holding
    `"; touch x; echo "` (and a quote) reaches them as one plain argument
    each, and the injected command does not run."""
    root = "gs://b/runs\"; touch x; echo \"'; touch y; '"
    job = dataclasses.replace(_job("glr2020", "v4-8"), root=root)
    home, bin_dir, calls = tmp_path / "home", tmp_path / "bin", tmp_path / "calls"
    venv_bin = home / tpu_job.SOURCE_DIR / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    bin_dir.mkdir()
    fakes = {
        venv_bin / "python": "exit 3",  # the stage fails: its rc is the script's
        bin_dir / "gsutil": "",
        bin_dir / "hostname": "echo worker-0",
    }
    for path, body in fakes.items():
        # One argument per line, so an argument's spaces and quotes stay visible.
        path.write_text(
            f'#!/bin/bash\n[ {path.name} = hostname ] || printf "%s\\n" {path.name} "$@" -- '
            f">> {calls}\n{body}\n"
        )
        path.chmod(0o755)
    script = tpu_job._logged(job, "clean", tpu_job.train_argv(job, 0))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)}
    result = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, timeout=30)
    assert result.returncode == 3
    python, gsutil, _ = calls.read_text().split("--\n")
    assert f"--workdir={root}/glr2020/clean" in python.splitlines()
    assert gsutil.splitlines() == [
        "gsutil",
        "-q",
        "cp",
        f"{home}/glr2020-clean.log",
        f"{root}/glr2020/logs/clean-worker-0.log",
    ]
    assert not [p for p in tmp_path.rglob("*") if p.name in ("x", "y")]
