"""Faults during training: preemption, damaged checkpoints, non-finite losses."""

import errno
import inspect
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest
from configs_for_tests import REPO, config_for, losses_of

from landmark_jax import trainer
from landmark_jax.data import input_pipeline
from landmark_jax.training import preemption
from landmark_jax.workdir import checkpoint_integrity, checkpointing


@pytest.mark.e2e
def test_sigterm_saves_the_step_and_stops_then_the_run_resumes(
    demo, reference_losses, tmp_path, monkeypatch
):
    """SIGTERM (a preemption notice) on one process: the trainer saves the
    step it is at, stops with Preempted, and a rerun resumes from it."""
    assert threading.current_thread() is threading.main_thread()  # signal handlers live here
    config = config_for(demo["full"], total_steps=6, checkpoint_every_steps=100)

    # The notice arrives while the loop fetches the batch of step 4.
    fetched = []
    real_iterator = input_pipeline.train_iterator

    def notice_at_step_4(*args, **kwargs):
        for batch in real_iterator(*args, **kwargs):
            fetched.append(1)
            if len(fetched) == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(input_pipeline, "train_iterator", notice_at_step_4)
    workdir = str(tmp_path / "run")
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preemption.Preempted, match="preempted at step 4") as stopped:
        trainer.train_and_evaluate(config, workdir)
    assert stopped.value.step == 4
    assert checkpointing.saved_steps(workdir) == [4]  # saved although 4 is no save step
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the handler is gone again

    monkeypatch.setattr(input_pipeline, "train_iterator", real_iterator)
    # The rerun restores into the abstract state: no step-0 state is built
    # (compiled, run, held beside the restored one).
    from landmark_jax.training import train_steps

    def no_initialisation(program):
        raise AssertionError("a resume initialised the state")

    monkeypatch.setattr(train_steps.Program, "initial_state", no_initialisation)
    trainer.train_and_evaluate(config, workdir)
    got = losses_of(workdir)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in got], [reference_losses[s] for s in got], rtol=1e-5)


def _train_program(program: str, workdir) -> subprocess.CompletedProcess:
    """Runs `program` (Python that patches the trainer, then runs train.main)
    as `python -m landmark_jax.train` would be run on the demo smoke config."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            program,
            f"--config={REPO}/configs/demo.py:smoke",
            f"--workdir={workdir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.e2e
def test_train_program_exits_75_when_preempted(tmp_path):
    """The exit status a job runner relaunches on (the saving is tested above)."""
    program = (
        "import sys\n"
        "from absl import app\n"
        "from landmark_jax import train, trainer\n"
        "from landmark_jax.training import preemption\n"
        "def preempted(config, workdir):\n"
        "    raise preemption.Preempted(7, workdir)\n"
        "trainer.train_and_evaluate = preempted\n"
        "app.run(train.main)\n"
    )
    result = _train_program(program, tmp_path)
    assert result.returncode == preemption.PREEMPTED_EXIT_STATUS == 75, result.stderr[-2000:]
    assert "preempted at step 7" in result.stderr and "run the same command again" in result.stderr


@pytest.fixture
def no_retry_wait(monkeypatch):
    """Retries of a failed read without the waits between them."""
    monkeypatch.setattr(checkpoint_integrity, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def _config(demo, total_steps, **overrides):
    """The checkpoint tests' config: a checkpoint every 2 steps."""
    return config_for(demo["full"], total_steps=total_steps, checkpoint_every_steps=2, **overrides)


@pytest.fixture(scope="module")
def four_steps(demo, tmp_path_factory):
    """(workdir, losses) of 4 steps of _config, checkpoints 2 and 4: each test
    works on its own copy (`run`) rather than training it again."""
    workdir = str(tmp_path_factory.mktemp("four_steps") / "run")
    trainer.train_and_evaluate(_config(demo, 4), workdir)
    return workdir, losses_of(workdir)


@pytest.fixture
def run(four_steps, tmp_path):
    """A copy of the four_steps workdir."""
    workdir = str(tmp_path / "run")
    shutil.copytree(four_steps[0], workdir)
    return workdir


def _files_of(workdir, step):
    folder = os.path.join(workdir, "checkpoints", str(step))
    return [os.path.join(r, f) for r, _, names in os.walk(folder) for f in names]


def _damage(path):
    """4 KB of random bytes into the middle of a file."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(np.random.default_rng(0).bytes(4096))


def _damage_step(workdir, step):
    """Damages a step's largest file (parameter data); returns its path."""
    target = max(_files_of(workdir, step), key=os.path.getsize)
    _damage(target)
    return target


def _moved_aside(workdir):
    return sorted(
        name
        for name in os.listdir(os.path.join(workdir, "checkpoints"))
        if name.startswith(checkpoint_integrity.DAMAGED_PREFIX)
    )


@pytest.mark.e2e
def test_a_damaged_checkpoint_is_moved_aside_and_the_run_falls_back(
    demo, four_steps, run, caplog, no_retry_wait
):
    workdir, first = run, four_steps[1]
    assert checkpointing.saved_steps(workdir) == [2, 4]
    # Each step carries its own record, inside its folder.
    for step in (2, 4):
        assert os.path.isfile(os.path.join(workdir, "checkpoints", str(step), "integrity.json"))

    target = _damage_step(workdir, 4)
    # Evaluation and a next stage read the latest step: an error, not other weights,
    # with advice that keeps the step.
    with pytest.raises(ValueError, match=f"evaluation: checkpoint .*/4 is damaged: {target}: its"):
        checkpointing.load_stage(workdir, "evaluation")
    with caplog.at_level(logging.WARNING):
        trainer.train_and_evaluate(_config(demo, 6), workdir)
    assert f"{target}: its SHA-256 differs from the one recorded" in caplog.text
    # Moved aside with every byte, not deleted; step 4 trained and saved again.
    (aside,) = _moved_aside(workdir)
    assert aside.startswith("damaged-4-") and aside in caplog.text
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", aside))) == sorted(
        os.listdir(os.path.join(workdir, "checkpoints", "2"))
    )
    assert checkpointing.saved_steps(workdir) == [2, 4, 6]
    second = losses_of(workdir)
    np.testing.assert_allclose([second[s] for s in (3, 4)], [first[s] for s in (3, 4)], rtol=1e-5)

    # A step without its record (a run stopped between the commit and the
    # record) is unverified, not damaged; Orbax cannot read it without its
    # data files, so it is damaged, moved aside, and the run falls back.
    os.remove(os.path.join(workdir, "checkpoints", "6", "integrity.json"))
    for f in [f for f in _files_of(workdir, 6) if f"{os.sep}d{os.sep}" in f]:
        os.remove(f)
    with pytest.raises(ValueError, match=r"checkpoint .*/6 is damaged: .*no integrity record, and"):
        checkpointing.load_stage(workdir)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trainer.train_and_evaluate(_config(demo, 8), workdir)
    assert re.search(r"checkpoints/6 is damaged \(.*no integrity record, and Orbax", caplog.text)
    third = losses_of(workdir)
    assert sorted(third) == list(range(1, 9))
    np.testing.assert_allclose([third[s] for s in (5, 6)], [second[s] for s in (5, 6)], rtol=1e-5)
    assert len(_moved_aside(workdir)) == 2


@pytest.mark.e2e
def test_advice_to_move_checkpoints_aside_is_followed_and_the_run_resumes(demo, run, no_retry_wait):
    """Every message that tells a user to move a checkpoint: follow it, then resume.

    Before the records lived in their steps, following such advice left
    stale digests that condemned every later step of that number."""
    workdir = run
    # load_stage's advice for a damaged latest step.
    _damage_step(workdir, 4)
    with pytest.raises(ValueError, match=r"move that step's folder aside \(mv \S+ \S+\)") as e:
        checkpointing.load_stage(workdir, "evaluation")
    source, target = re.search(r"\(mv (\S+) (\S+)\)", str(e.value)).groups()
    os.rename(source, target)
    assert checkpointing.load_stage(workdir)["step"] == 2
    trainer.train_and_evaluate(_config(demo, 6), workdir)  # 4 saved again, with its record
    assert checkpointing.saved_steps(workdir) == [2, 4, 6]
    assert checkpointing.load_stage(workdir)["step"] == 6

    # Every step damaged: nothing moved; follow the advice.
    for step in (2, 4, 6):
        _damage_step(workdir, step)
    with pytest.raises(RuntimeError, match="every checkpoint in") as e:
        trainer.train_and_evaluate(_config(demo, 8), workdir)
    assert checkpointing.saved_steps(workdir) == [2, 4, 6]
    assert _moved_aside(workdir) == ["damaged-4"]  # the one the user moved above
    source, target = re.search(r"\(mv (\S+) (\S+)\)", str(e.value)).groups()
    os.rename(source, target)
    trainer.train_and_evaluate(_config(demo, 2), workdir)  # from step 0, as the message says
    assert checkpointing.saved_steps(workdir) == [2]
    assert checkpointing.load_stage(workdir)["step"] == 2


@pytest.mark.e2e
def test_an_integrity_record_is_the_steps_own(demo, run, no_retry_wait):
    """A step removed by hand and saved again, or the whole folder removed,
    gets a new record; a record that is not JSON leaves the step unverified."""
    workdir = run
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    trainer.train_and_evaluate(_config(demo, 4), workdir)  # resumes at 2, saves 4 again
    assert checkpointing.load_stage(workdir)["step"] == 4
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    trainer.train_and_evaluate(_config(demo, 2), workdir)
    assert checkpointing.saved_steps(workdir) == [2] and not _moved_aside(workdir)
    # A record cut short: the step is unverified, and restored.
    record = os.path.join(workdir, "checkpoints", "2", "integrity.json")
    with open(record, "r+b") as f:
        f.truncate(20)
    verdict = checkpoint_integrity.check(os.path.join(workdir, "checkpoints"), 2)
    assert verdict.status == checkpoint_integrity.UNVERIFIED
    assert "not a readable" in verdict.evidence
    assert checkpointing.load_stage(workdir)["step"] == 2
    trainer.train_and_evaluate(_config(demo, 4), workdir)
    assert checkpointing.saved_steps(workdir) == [2, 4] and not _moved_aside(workdir)


@pytest.mark.e2e
def test_a_read_error_on_a_verified_step_is_retried_never_damage(
    demo, run, monkeypatch, no_retry_wait
):
    workdir = run
    real = ocp.CheckpointManager.restore
    failures = []

    def flaky(self, step, *args, **kwargs):
        if len(failures) < failing:
            failures.append(step)
            raise ConnectionError(f"simulated network error reading step {step}")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    # It persists: the run fails naming the step, and nothing is moved.
    failing = 100
    with pytest.raises(OSError, match=r"checkpoints/4 matches the digests .*ConnectionError"):
        trainer.train_and_evaluate(_config(demo, 6), workdir)
    assert checkpointing.saved_steps(workdir) == [2, 4] and not _moved_aside(workdir)
    # One transient error: retried, resumed from the intact latest step.
    failures.clear()
    failing = 1
    trainer.train_and_evaluate(_config(demo, 6), workdir)
    assert failures == [4] and checkpointing.saved_steps(workdir) == [2, 4, 6]


@pytest.mark.e2e
def test_a_config_that_does_not_fit_is_a_config_error(demo, run):
    adam = _config(demo, 6, **{"optimizer.name": "adam"})
    with pytest.raises(ValueError, match="does not fit this config") as e:
        trainer.train_and_evaluate(adam, run)
    assert "optimizer.name: 'sgd' -> 'adam'" in str(e.value)
    assert "damaged" not in str(e.value)
    assert checkpointing.saved_steps(run) == [2, 4] and not _moved_aside(run)


@pytest.mark.e2e
def test_another_class_set_is_refused_on_resume_and_with_carry_all(demo, run, tmp_path):
    """10 and 6 classes both pad the head to 1,024 rows: the shapes agree."""
    subset = dict(demo, full=demo["subset"])
    with pytest.raises(ValueError, match=r"trained on 10 classes .* has 6"):
        trainer.train_and_evaluate(_config(subset, 6), run)
    carried = _config(subset, 2, **{"init.checkpoint": run, "init.carry": "all"})
    with pytest.raises(ValueError, match=r"init.carry='all'\) was trained on 10 classes"):
        trainer.train_and_evaluate(carried, str(tmp_path / "next"))
    # The same count of other landmark ids: named as such.
    with open(os.path.join(run, "config.json")) as f:
        recorded = json.load(f)
    recorded["classes_sha256"] = "0" * 64
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(recorded, f)
    with pytest.raises(ValueError, match="as many, but other landmark ids"):
        trainer.train_and_evaluate(_config(demo, 6), run)


@pytest.mark.e2e
def test_non_finite_loss_stops_with_its_step(demo, run, tmp_path):
    # An absurd learning rate overflows the weights after the first update.
    config = config_for(demo["full"], total_steps=4, **{"optimizer.learning_rate": 1e38})
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        trainer.train_and_evaluate(config, str(tmp_path / "a"))
    # Skipping keeps the weights; past max_skipped the run stops.
    config.nonfinite.skip_updates = True
    config.nonfinite.max_skipped = 1
    with pytest.raises(FloatingPointError, match=r"non-finite steps \(first at step 2\)"):
        trainer.train_and_evaluate(config, str(tmp_path / "b"))
    # Right after a resume: the error names what changed since the checkpoint,
    # which verified, and advises nothing about deleting it.
    config = _config(demo, 6, log_every_steps=2, **{"optimizer.learning_rate": 1e38})
    with pytest.raises(FloatingPointError, match="resuming from the step-4 checkpoint") as e:
        trainer.train_and_evaluate(config, run)
    message = str(e.value)
    assert "optimizer.learning_rate: 0.1 -> 1e+38" in message, message
    assert "match the digests" in message
    assert "delete" not in message and "remove" not in message


@pytest.mark.e2e
def test_a_split_with_fewer_shards_than_processes_is_refused_at_start_up(
    demo, tmp_path, monkeypatch
):
    """Not at the first validation, 10,000 steps into a recipe."""
    import dataclasses

    from landmark_jax.data import data_format

    real = data_format.read_split_info

    def one_val_shard(data_dir, split):
        info = real(data_dir, split)
        if split != "val":
            return info
        return dataclasses.replace(info, files=info.files[:1], file_examples=info.file_examples[:1])

    assert len(real(demo["full"], "train").files) >= 2
    monkeypatch.setattr(data_format, "read_split_info", one_val_shard)
    monkeypatch.setattr(trainer.jax, "process_count", lambda: 2)
    config = config_for(demo["full"], total_steps=4, **{"val.every_steps": 2})
    fewer = r"split 'val' has 1 shard file\(s\), fewer than the 2 processes"
    with pytest.raises(ValueError, match=fewer):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.e2e
def test_a_failed_or_preempted_validation_keeps_its_step(demo, tmp_path, monkeypatch):
    """The step is saved before the validation pass: a pass that fails, or that
    a preemption notice cuts short, loses no training."""
    config = config_for(
        demo["full"], total_steps=6, checkpoint_every_steps=100, **{"val.every_steps": 2}
    )
    real_validate = trainer.validate

    def failing(*args, **kwargs):
        raise OSError("simulated: the validation data went away")

    monkeypatch.setattr(trainer, "validate", failing)
    streams, real_train_iterator = [], input_pipeline.train_iterator

    def kept(*args, **kwargs):
        streams.append(real_train_iterator(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(input_pipeline, "train_iterator", kept)
    failed = str(tmp_path / "failed")
    with pytest.raises(OSError, match="went away") as raised:
        trainer.train_and_evaluate(config, failed)
    # The input stream was closed on the way out (its tf.data iterator
    # released then), though the traceback still holds the trainer's frame.
    assert raised.tb is not None
    assert [inspect.getgeneratorstate(s) for s in streams] == [inspect.GEN_CLOSED]
    assert checkpointing.saved_steps(failed) == [2]
    assert checkpoint_integrity.check(os.path.join(failed, "checkpoints"), 2).status == "verified"

    # SIGTERM arrives during the pass (at its first batch): the pass is
    # abandoned, the step saved, and the run stops as preempted.
    real_iterator = input_pipeline.eval_iterator

    def notice_during_validation(*args, **kwargs):
        it, num_steps = real_iterator(*args, **kwargs)

        def batches():
            for i, batch in enumerate(it):
                if i == 0:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        return batches(), num_steps

    monkeypatch.setattr(trainer, "validate", real_validate)
    monkeypatch.setattr(input_pipeline, "eval_iterator", notice_during_validation)
    preempted = str(tmp_path / "preempted")
    with pytest.raises(preemption.Preempted, match="preempted at step 2"):
        trainer.train_and_evaluate(config, preempted)
    assert checkpointing.saved_steps(preempted) == [2]


@pytest.mark.e2e
def test_a_full_disk_stops_the_run_before_the_checkpoint_is_written(demo, tmp_path, monkeypatch):
    """A checkpoint that cannot fit is refused before Orbax's writers start (they
    would fail in their threads, leaving a half-written folder and hundreds of
    lines); following the message's advice (free space, run again) resumes."""
    from landmark_jax.runtime import file_io

    config = config_for(demo["full"], total_steps=4, checkpoint_every_steps=2)
    workdir = str(tmp_path / "run")
    monkeypatch.setattr(file_io, "free_bytes", lambda path: 1000)
    with pytest.raises(
        OSError, match=r"the step-2 checkpoint needs about [\d,]+ bytes; 1,000 bytes"
    ) as e:
        trainer.train_and_evaluate(config, workdir)
    assert e.value.errno == errno.ENOSPC
    assert f"{workdir}/checkpoints" in str(e.value) and "starts at step 0" in str(e.value)
    assert checkpointing.saved_steps(workdir) == []
    monkeypatch.undo()  # space freed
    trainer.train_and_evaluate(config, workdir)
    assert checkpointing.saved_steps(workdir) == [2, 4]


def test_a_disk_full_error_inside_orbax_is_named():
    """TensorStore's ENOSPC, as Orbax re-raises it from its writer thread."""
    from landmark_jax.runtime import file_io

    inner = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file '
        '"/w/checkpoints/5.orbax-checkpoint-tmp/default/": Failed writing: '
        '"/w/checkpoints/5.orbax-checkpoint-tmp/default/d/10318ea1": Failed to write 465797 '
        "bytes to file 5: No space left on device [os_error_code='28']"
    )
    try:
        try:
            raise inner
        except ValueError as e:
            raise RuntimeError("Save Finalize thread (save_finalize) failed.") from e
    except RuntimeError as outer:
        described = file_io.no_space_left(outer)
    assert described == (
        "writing /w/checkpoints/5.orbax-checkpoint-tmp/default/d/10318ea1: "
        "465,797 bytes did not fit"
    )
    assert file_io.no_space_left(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None


@pytest.mark.e2e
def test_train_program_prints_one_line_when_the_disk_is_full(tmp_path):
    program = (
        "from landmark_jax import train, trainer\n"
        "from landmark_jax.runtime import entry_point_errors, file_io\n"
        "from landmark_jax.workdir import checkpoint_saving\n"
        "class Manager:\n"
        "    directory = '/w/checkpoints'\n"
        "def full(config, workdir):\n"
        "    file_io.free_bytes = lambda path: 10\n"
        "    checkpoint_saving.save(Manager(), 5, {'x': __import__('numpy').zeros(4)})\n"
        "trainer.train_and_evaluate = full\n"
        "entry_point_errors.run(train.main)\n"
    )
    result = _train_program(program, tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the disk of /w/checkpoints: the step-5")
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_step_the_device_cannot_hold_stops_before_training(demo, tmp_path, monkeypatch):
    """Where a device reports its memory (TPU, GPU): the compiled step's peak
    against it, before any step runs; following the advice (a smaller
    batch) the run goes on."""
    from landmark_jax.training import step_fit

    class Measured(Exception):
        pass

    peaks = []
    real_check = step_fit.check_step_fits

    def measure(*args):
        peaks.append(real_check(*args))
        raise Measured

    # The peak of the 8-image step (1 per device), measured; nothing trained.
    smaller = config_for(demo["full"], total_steps=2, batch_size=8)
    monkeypatch.setattr(step_fit, "device_memory_limit", lambda: 64 << 30)
    monkeypatch.setattr(step_fit, "check_step_fits", measure)
    with pytest.raises(Measured):
        trainer.train_and_evaluate(smaller, str(tmp_path / "probe"))
    monkeypatch.setattr(step_fit, "check_step_fits", real_check)
    # A device that holds exactly that: the 16-image step is refused.
    monkeypatch.setattr(step_fit, "device_memory_limit", lambda: peaks[0])
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"needs about [\d.]+ GiB per device .* holds") as e:
        trainer.train_and_evaluate(config_for(demo["full"], total_steps=2), workdir)
    assert "config.batch_size (now 16, 2 per device)" in str(e.value)
    assert "model.remat='blocks'" in str(e.value)
    assert checkpointing.saved_steps(workdir) == []
    trainer.train_and_evaluate(smaller, workdir)  # the advice followed
    assert checkpointing.saved_steps(workdir) == [2]


def test_processes_check_the_preemption_sync_point_at_every_step_and_validation_batch(
    monkeypatch,
):
    """JAX's sync point is the largest id any process reported, plus one: every
    process must report consecutive ids in the same order. Steps and
    validation batches share one counter, so a notice during a validation
    pass is acted on at its next batch on every process alike."""
    from landmark_jax.training import preemption

    class Manager:  # JAX's answer: the sync point is the 4th check
        def __init__(self):
            self.ids = []

        def reached_preemption(self, check_id):
            self.ids.append(check_id)
            return check_id == 4

    monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
    manager = Manager()
    notice = preemption.PreemptionNotice(manager)
    answers = [notice.reached(7), notice.received(), notice.received(), notice.received()]
    assert answers == [False, False, False, True]  # stops inside the validation pass
    assert notice.reached(8) is False
    assert manager.ids == [1, 2, 3, 4, 5]


@pytest.mark.e2e
def test_a_short_validation_shard_is_refused_at_start_up(demo, tmp_path):
    """A val shard cut at a record boundary: named before training, not at the
    first validation (or, padded, never)."""
    import struct

    from landmark_jax.data import data_format

    build = os.path.dirname(data_format.read_split_info(demo["full"], "val").files[0])
    copy = str(tmp_path / "build")
    shutil.copytree(build, copy)
    info = data_format.read_split_info(copy, "val")
    shard, listed = info.files[0], info.file_examples[0]
    data, end = open(shard, "rb").read(), 0
    for _ in range(listed - 1):  # keep all records but the last
        end += 8 + 4 + struct.unpack("<Q", data[end : end + 8])[0] + 4
    open(shard, "wb").write(data[:end])
    config = config_for(copy, total_steps=4, **{"val.every_steps": 2})
    with pytest.raises(
        data_format.DataFormatError,
        match=re.escape(f"{shard}: {listed - 1} records, dataset_info.json lists {listed}"),
    ):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
