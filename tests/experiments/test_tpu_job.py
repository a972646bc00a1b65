"""experiments/tpu_vm/tpu_job.py: the commands of a TPU VM batch job, and its retries."""

import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from unittest import mock

import pytest
from configs_for_tests import REPO, load_config


def _load(name):
    """experiments/tpu_vm/NAME.py as module NAME: tpu_job.py and its sibling
    modules import one another by name (as when the script runs)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "experiments", "tpu_vm", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# In import order: each module's siblings before it.
recipes = _load("recipes")
gcloud_commands = _load("gcloud_commands")
worker_commands = _load("worker_commands")
program_checks = _load("program_checks")
queued_resources = _load("queued_resources")
tpu_job = _load("tpu_job")

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
# configs/glr2020_ensemble.py:article's members.
ARTICLE = {n: f"{ROOT}/{n}/notclean" for n in ("b7", "b6", "b5_a", "b5_b")}


def _job(recipe="glr2020", accelerator_type="v4-32", **kwargs):
    data = {"clean": "gs://bucket/clean", "full": "gs://bucket/full", "x": "gs://bucket/x"}
    return recipes.Job(
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
    assert recipes.num_hosts(kind) == hosts


def test_num_hosts_names_a_bad_type():
    with pytest.raises(ValueError, match="--accelerator_type='tpu-8'"):
        recipes.num_hosts("tpu-8")


@pytest.mark.parametrize("recipe", sorted(recipes.RECIPES))
def test_stages_chain_their_checkpoints_and_read_their_data(recipe):
    job = _job(recipe)
    stages = recipes.RECIPES[recipe].stages
    previous = None
    for i, stage in enumerate(stages):
        argv = worker_commands.train_argv(job, i)
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
    evaluate = worker_commands.evaluate_argv(job)
    assert _flag(evaluate, "workdir") == previous  # the last stage
    assert "--tpu_pod" not in worker_commands.train_argv(_job(recipe, "v4-8"), 0)  # one host


@pytest.mark.e2e
def test_dry_run_prints_every_command_in_order():
    """With the :article members (b7, b6, b5_a, b5_b) the evaluation reads
    configs/glr2020_ensemble.py:article; every command was checked by its
    program's own flag parser first (before, the default variant's evaluate
    failed on 'b7' after every stage had trained)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "experiments/tpu_vm/tpu_job.py"]
        + ["--recipe=glr2020", "--dry_run", "--accelerator_type=v4-32", "--spot", *FLAGS]
        + ["--retrieval_solution=gs://bucket/sol.csv"]
        + [f"--member={n}={w}" for n, w in ARTICLE.items()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Checking the commands on a workstation (config_lib.validate_config,
    # eval_config.validate_eval_config) imports neither TensorFlow nor the
    # extraction code: 1-2 s, not 5.
    imported = {
        line.split("|")[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "landmark_jax.retrieval.eval_config" in imported
    assert "tensorflow" not in imported and "landmark_jax.retrieval.extract" not in imported
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
    argv = shlex.split(
        script.split(f"cd $HOME/{worker_commands.SOURCE_DIR}; ")[1].split(" 2>&1")[0]
    )
    assert argv[:3] == [".venv/bin/python", "-m", "landmark_jax.evaluate"]
    assert _flag(argv, "config") == "configs/glr2020_ensemble.py:article"
    for name, workdir in ARTICLE.items():
        assert _flag(argv, f"config.eval.ensemble.{name}.workdir") == workdir
    assert _flag(argv, "config.eval.retrieval_solution") == "gs://bucket/sol.csv"
    assert _flag(argv, "config.eval.recognition_submission") == "False"


@pytest.mark.e2e
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
    job = _job("glr2021", "v4-8", recognition_solution="gs://bucket/recognition_solution.csv")
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
    script = worker_commands.install_script(_job())
    for _ in range(2):
        subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30)
    lines = calls.read_text().splitlines()
    src = worker_commands.SOURCE_DIR
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
    venv_bin = home / worker_commands.SOURCE_DIR / ".venv" / "bin"
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
    script = worker_commands._logged(job, "clean", worker_commands.train_argv(job, 0))
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


# --- Queued resources, under a fake `gcloud` on PATH ------------------------------

# A stand-in for `gcloud compute tpus ...`, driven by a JSON state file: the
# queued resource's states to come (one per `describe`, the last one kept),
# what each `create` queues, and the stage whose ssh a preemption ends. It
# answers as gcloud does: `describe --format=json` prints the QueuedResource
# (its state in state.state, a failure's reason in state.failedData.error),
# a missing one is a NOT_FOUND error, a second `create` an ALREADY_EXISTS one,
# and ssh reaches the node only once the request has been seen ACTIVE.
FAKE_GCLOUD = r"""#!{python} -S
import json, sys

STATE, args = {state!r}, sys.argv[1:]
with open(STATE) as f:
    s = json.load(f)
group, verb = args[2], args[3]
name, zone = args[4], [a for a in args if a.startswith("--zone=")][0][7:]
path = f"projects/my-project/locations/{{zone}}/queuedResources/{{name}}"
rc, label = 0, verb


def error(code, message):
    sys.stderr.write(f"ERROR: (gcloud.compute.tpus.{{group}}.{{verb}}) {{code}}: {{message}}\n")
    return 1


resource = s["resource"]
if group == "queued-resources" and verb == "describe":
    if resource is not None and resource["states"][0] == "GONE":  # a DELETING one ended
        resource = s["resource"] = None
    if resource is None:
        rc, label = error("NOT_FOUND", f"Resource '{{path}}' was not found"), "describe:NOT_FOUND"
    else:
        state = resource["states"].pop(0) if len(resource["states"]) > 1 else resource["states"][0]
        resource["seen"] = state
        data = {{"state": state, "stateInitiator": "SERVICE" if state == "SUSPENDED" else "USER"}}
        if state == "FAILED":
            data["failedData"] = {{"error": {{"code": 8, "message": s["failure"]}}}}
        print(json.dumps({{
            "createTime": "2025-05-07T10:00:00.000000Z",
            "name": path,
            "spot": {{}},
            "state": data,
            "tpu": {{"nodeSpec": [{{
                "node": {{"acceleratorType": "v4-8", "runtimeVersion": "tpu-ubuntu2204-base",
                         "networkConfig": {{"enableExternalIps": True}},
                         "queuedResource": path, "useTpuVm": True}},
                "nodeId": name,
                "parent": f"projects/my-project/locations/{{zone}}",
            }}]}},
        }}, indent=2))
        label = f"describe:{{state}}"
elif group == "queued-resources" and verb == "create":
    if resource is None and s["appears"]:  # another run's request, made meanwhile
        resource = s["resource"] = {{"states": s["appears"].pop(0), "seen": None}}
    if s["create_error"]:
        rc, label = error("PERMISSION_DENIED", s["create_error"]), "create:DENIED"
    elif resource is not None:
        rc, label = error("ALREADY_EXISTS", f"Resource '{{path}}' already exists"), "create:EXISTS"
    else:
        s["resource"] = {{"states": s["queue"].pop(0), "seen": None}}
elif group == "queued-resources" and verb == "delete":
    s["resource"] = None
elif group == "tpu-vm" and verb == "ssh":
    script = args[-1]
    if "pip install" in script:
        label = "install"
    elif "landmark_jax.evaluate" in script:
        label = "evaluate"
    else:
        label = script.split("--workdir=")[1].split()[0].rsplit("/", 1)[1]
    if resource is None or resource["seen"] != "ACTIVE":
        rc, label = error("NOT_FOUND", f"node {{name}} not found"), "ssh-refused:" + label
    elif s["preempt"] == label:  # the spot slice is taken back mid-stage
        s["preempt"], resource["states"], resource["seen"] = None, ["SUSPENDING", "SUSPENDED"], None
        rc = 255
else:
    rc = error("INVALID_ARGUMENT", "the fake does not know " + " ".join(args))
s["calls"].append(label)
with open(STATE, "w") as f:
    json.dump(s, f)
sys.exit(rc)
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """Installs the fake gcloud; returns play(job, resource=..., queue=...)
    that runs the job through it with a fake clock and returns the calls,
    the sleeps and the log."""
    bin_dir, state = tmp_path / "bin", tmp_path / "gcloud_state.json"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, state=str(state)))
    gcloud.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def play(
        job,
        *,
        resource=None,
        queue=(),
        appears=(),
        preempt=None,
        failure="",
        create_error="",
        timeout_s=86400.0,
        poll_s=60.0,
    ):
        state.write_text(
            json.dumps(
                {
                    "resource": None if resource is None else {"states": resource, "seen": None},
                    "queue": list(queue),
                    "appears": list(appears),
                    "preempt": preempt,
                    "failure": failure,
                    "create_error": create_error,
                    "calls": [],
                }
            )
        )
        now, sleeps, lines = [0.0], [], []

        def sleep(seconds):
            sleeps.append(seconds)
            now[0] += seconds

        def info(msg, *args):
            lines.append(msg % args)

        with (
            mock.patch.object(tpu_job.logging, "info", info),
            mock.patch.object(tpu_job.logging, "warning", info),
        ):
            try:
                tpu_job.run_job(
                    job,
                    wait_seconds=5.0,
                    queued_timeout_s=timeout_s,
                    poll_seconds=poll_s,
                    clock=lambda: now[0],
                    sleep=sleep,
                )
                error = None
            except RuntimeError as e:
                error = str(e)
        return json.loads(state.read_text())["calls"], sleeps, lines, error

    return play


def _queued_job():
    return dataclasses.replace(_job("glr2021", "v4-8"), queued=True, spot=True)


STAGES = ["install", "step1", "step2", "step3", "evaluate"]
WHERE = "queued resource lm in us-central2-b"


def _progress(lines):
    return [line for line in lines if line.startswith(WHERE)]


def test_a_new_queued_resource_is_waited_on_until_active(fake_gcloud):
    """Created, then polled through the states in the real order (not SSHed
    into at once, the bug): the stages run once it is ACTIVE."""
    calls, sleeps, lines, error = fake_gcloud(
        _queued_job(),
        queue=[
            ["CREATING", "WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING"]
            + ["ACTIVE"]
        ],
    )
    assert error is None
    assert calls == [
        "describe:NOT_FOUND",
        "create",
        "describe:CREATING",
        "describe:WAITING_FOR_RESOURCES",
        "describe:WAITING_FOR_RESOURCES",
        "describe:PROVISIONING",
        "describe:ACTIVE",
        *STAGES,
    ]
    assert sleeps == [60.0] * 5  # after the creation and after each state short of ACTIVE
    # One line per change of state, with the time waited (60 s a poll).
    assert _progress(lines) == [
        f"{WHERE} requested",
        f"{WHERE} is CREATING (waited 0h01m)",
        f"{WHERE} is WAITING_FOR_RESOURCES (waited 0h02m)",
        f"{WHERE} is PROVISIONING (waited 0h04m)",
        f"{WHERE} is ACTIVE (waited 0h05m)",
    ]


def test_rerunning_the_job_waits_on_the_queued_request_instead_of_creating_another(
    fake_gcloud,
):
    calls, _, _, error = fake_gcloud(
        _queued_job(), resource=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
    )
    assert error is None
    assert calls == [
        "describe:WAITING_FOR_RESOURCES",
        "describe:PROVISIONING",
        "describe:ACTIVE",
        *STAGES,
    ]


@pytest.mark.parametrize(
    ("before", "failure"),
    [(["SUSPENDED"], ""), (["FAILED"], "There is no more capacity in the zone")]
    + [(["SUSPENDING", "SUSPENDED"], ""), (["DELETING", "GONE"], "")],
)
def test_a_suspended_failed_or_ending_request_is_queued_again(fake_gcloud, before, failure):
    """SUSPENDED (a preempted spot slice) and FAILED: deleted and queued
    again; SUSPENDING and DELETING are waited out first."""
    calls, _, lines, error = fake_gcloud(
        _queued_job(), resource=before, queue=[["WAITING_FOR_RESOURCES", "ACTIVE"]], failure=failure
    )
    assert error is None
    ending = [f"describe:{before[0]}"] if len(before) > 1 else []
    if before[-1] == "GONE":  # DELETING ends with no request: created, nothing to delete
        gone = ["describe:NOT_FOUND", "create"]
    else:
        gone = [f"describe:{before[-1]}", "delete", "create"]
    assert calls == [
        *ending,
        *gone,
        "describe:WAITING_FOR_RESOURCES",
        "describe:ACTIVE",
        *STAGES,
    ]
    if failure:  # the reason gcloud gives is shown
        assert f"{WHERE} is FAILED ({failure}): deleting it and queueing it again" in lines


def test_a_request_made_meanwhile_by_another_run_is_waited_on(fake_gcloud):
    """`create` answering ALREADY_EXISTS (another run queued the same name
    between our describe and create): waited on, not an error."""
    calls, _, _, error = fake_gcloud(_queued_job(), appears=[["PROVISIONING", "ACTIVE"]])
    assert error is None
    assert calls == [
        "describe:NOT_FOUND",
        "create:EXISTS",
        "describe:PROVISIONING",
        "describe:ACTIVE",
        *STAGES,
    ]


def test_a_spot_request_preempted_mid_stage_is_queued_again_and_the_stage_resumes(
    fake_gcloud,
):
    calls, _, _, error = fake_gcloud(
        _queued_job(),
        queue=[["CREATING", "ACTIVE"], ["WAITING_FOR_RESOURCES", "ACTIVE"]],
        preempt="step2",
    )
    assert error is None
    assert calls == [
        "describe:NOT_FOUND",
        "create",
        "describe:CREATING",
        "describe:ACTIVE",
        "install",
        "step1",
        "step2",  # preempted: exit 255
        "describe:SUSPENDING",
        "describe:SUSPENDED",
        "delete",
        "create",
        "describe:WAITING_FOR_RESOURCES",
        "describe:ACTIVE",
        "install",  # a new node: set up again
        "step2",  # resumes from its checkpoint
        "step3",
        "evaluate",
    ]


def test_the_wait_for_a_queued_resource_is_bounded_and_keeps_the_request(fake_gcloud):
    calls, sleeps, lines, error = fake_gcloud(
        _queued_job(), resource=["WAITING_FOR_RESOURCES"], timeout_s=3600.0, poll_s=300.0
    )
    # Polled at 0, 300, ..., 3600 s; at 3600 s the timeout stops the job.
    assert calls == ["describe:WAITING_FOR_RESOURCES"] * 13
    assert sleeps == [300.0] * 12
    assert error == (
        f"{WHERE} is still WAITING_FOR_RESOURCES after 1h00m (--queued_timeout_hours): it "
        "stays queued, and running the job again waits on it; `gcloud compute tpus "
        "queued-resources delete lm --zone=us-central2-b --force` gives it up"
    )
    # A progress line at the first state, then every 10 minutes.
    assert [line.rsplit("(", 1)[1] for line in _progress(lines)] == [
        f"waited 0h{m:02d}m)" for m in (0, 10, 20, 30, 40, 50)
    ]


def test_a_request_this_run_queued_that_fails_stops_the_job_with_its_reason(fake_gcloud):
    calls, _, _, error = fake_gcloud(
        _queued_job(),
        queue=[["CREATING", "FAILED"]],
        failure="Invalid accelerator type v4-8 in zone us-central2-b",
    )
    assert calls == ["describe:NOT_FOUND", "create", "describe:CREATING", "describe:FAILED"]
    assert error == f"{WHERE} FAILED: Invalid accelerator type v4-8 in zone us-central2-b"


# --- Every command checked before anything runs --------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # One member of :article without the others.
        (["--member=b7=gs://b/b7"], "glr2020_ensemble.py:article also has member(s)"),
        (
            [f"--member={n}=gs://b/{n}" for n in ARTICLE] + ["--recognition_solution=gs://b/r"],
            "--recognition_solution with --member: configs/glr2020_ensemble.py evaluates "
            "retrieval only",
        ),
    ],
)
def test_the_dry_run_refuses_members_or_solutions_the_evaluation_cannot_take(extra, message):
    result = subprocess.run(
        [sys.executable, "experiments/tpu_vm/tpu_job.py", "--recipe=glr2020", "--dry_run"]
        + [*FLAGS, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not result.stdout  # nothing printed as if it would run


def test_member_names_select_one_ensemble_variant_or_are_refused():
    released = ("b7_640", "b6_640", "b7_640_second", "b7_512")
    assert program_checks.ensemble_variant({n: "w" for n in released}) == "released"
    assert program_checks.ensemble_variant(ARTICLE) == "article"
    with pytest.raises(
        ValueError,
        match=r"glr2020_ensemble.py:article also has member\(s\) "
        r"\['b5_a', 'b5_b', 'b6'\]",
    ):
        program_checks.ensemble_variant({"b7": "w"})  # --member=b7=... alone
    with pytest.raises(
        ValueError,
        match=r"\['b7', 'b7_640'\] are not the members of one variant"
        r".*:released has b6_640, b7_512, b7_640, b7_640_second; :article has "
        r"b5_a, b5_b, b6, b7",
    ):
        program_checks.ensemble_variant({"b7": "w", "b7_640": "w"})


def test_check_command_runs_the_programs_parser_and_config_checks():
    job = _job("glr2020", "v4-32")
    program_checks.check_commands(job)  # every stage and the evaluation, as built
    program_checks.check_commands(_job("glr2021", "v4-32", recognition_solution="gs://b/sol.csv"))
    # A member of another variant: caught before any training.
    evaluate = [".venv/bin/python", "-m", "landmark_jax.evaluate"]
    evaluate += ["--config=configs/glr2020_ensemble.py", "--workdir=gs://b/e"]
    with pytest.raises(
        ValueError,
        match=r"^step 'evaluate' would fail on the workers: .* its config has no key 'b7' "
        r"\(among --config.eval.ensemble.b7.workdir\)$",
    ):
        program_checks.check_command(
            job, "evaluate", evaluate + ["--config.eval.ensemble.b7.workdir=w"]
        )
    # A typo, and a value the config checks refuse, each named.
    train = worker_commands.train_argv(job, 1)
    with pytest.raises(
        ValueError, match=r"step 'full' .*no key 'lr' \(among .*--config.optimizer.lr\)"
    ):
        program_checks.check_command(job, "full", train + ["--config.optimizer.lr=0.1"])
    with pytest.raises(ValueError, match=r"step 'full' .*config.head.margin_type='arc'"):
        program_checks.check_command(job, "full", train + ["--config.head.margin_type=arc"])
    # Batch 64 on a v4-256 (128 devices) would stop the stage at its start.
    big = dataclasses.replace(job, accelerator_type="v4-256")
    with pytest.raises(
        ValueError,
        match=r"config.batch_size=64 must be a positive multiple "
        r"of the 128 devices",
    ):
        program_checks.check_command(big, "clean", worker_commands.train_argv(big, 0))


@pytest.mark.parametrize(
    ("recipe", "members", "recognition"),
    [("glr2020", {}, False), ("glr2021", {}, True), ("glr2020", ARTICLE, False)],
)
def test_the_evaluate_command_says_whether_it_embeds_the_train_split(recipe, members, recognition):
    """GLR2020 (retrieval) embeds only the index and test splits without a
    recognition solution; GLR2021 (recognition) writes its submission, so
    embeds the train split. The config the workers read says the same."""
    from landmark_jax.retrieval import recognition_evaluation

    variant = "article" if members else "released"
    job = _job(recipe, "v4-8", members=dict(members), ensemble_variant=variant)
    argv = worker_commands.evaluate_argv(job)
    assert _flag(argv, "config.eval.recognition_submission") == str(recognition)
    config = program_checks.parse_program_flags(argv).config
    assert recognition_evaluation.recognition_requested(config) is recognition
    if not members:  # the recipe's own config, without the job's flag
        name, arg = _flag(argv, "config").removeprefix("configs/").split(".py:")
        assert load_config(name, arg).eval.recognition_submission is recognition


def test_a_refused_queued_request_stops_the_job_with_gcloud_s_error(fake_gcloud):
    calls, _, _, error = fake_gcloud(
        _queued_job(), create_error="Permission 'tpu.queuedResources.create' denied"
    )
    assert calls == ["describe:NOT_FOUND", "create:DENIED"]
    assert error == (
        f"could not create {WHERE}: ERROR: (gcloud.compute.tpus.queued-resources.create) "
        "PERMISSION_DENIED: Permission 'tpu.queuedResources.create' denied"
    )
