"""Faults during training: preemption, damaged checkpoints, non-finite losses."""

import logging
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from landmark_jax import checkpointing, input_pipeline, preemption, trainer

from config_files import REPO, config_for, losses_of


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
    trainer.train_and_evaluate(config, workdir)
    got = losses_of(workdir)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in got], [reference_losses[s] for s in got], rtol=1e-5)


def test_train_program_exits_75_when_preempted(tmp_path):
    """The exit status a job runner relaunches on (the saving is tested above)."""
    program = (
        "import sys\n"
        "from absl import app\n"
        "from landmark_jax import preemption, train, trainer\n"
        "def preempted(config, workdir):\n"
        "    raise preemption.Preempted(7, workdir)\n"
        "trainer.train_and_evaluate = preempted\n"
        "app.run(train.main)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            program,
            f"--config={REPO}/configs/demo.py:smoke",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == preemption.PREEMPTED_EXIT_STATUS == 75, result.stderr[-2000:]
    assert "preempted at step 7" in result.stderr and "run the same command again" in result.stderr


def test_a_damaged_checkpoint_falls_back_to_the_one_before(demo, tmp_path, caplog):
    def config(total_steps):
        return config_for(demo["full"], total_steps=total_steps, checkpoint_every_steps=2)

    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(config(4), workdir)
    assert checkpointing.saved_steps(workdir) == [2, 4]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints_digests"))) == ["2.json", "4.json"]
    first = losses_of(workdir)

    def files_of(step):
        folder = os.path.join(workdir, "checkpoints", str(step))
        return [os.path.join(r, f) for r, _, names in os.walk(folder) for f in names]

    # 4 KB of random bytes inside step 4's largest file (parameter data).
    target = max(files_of(4), key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    # Evaluation and a next stage read the latest step: an error, not other weights.
    with pytest.raises(ValueError, match=f"evaluation: checkpoint .*/4 is damaged: {target}: its"):
        checkpointing.load_stage(workdir, "evaluation")
    with caplog.at_level(logging.WARNING):
        trainer.train_and_evaluate(config(6), workdir)
    assert f"{target}: its SHA-256 differs from the one recorded" in caplog.text
    assert "Deleting damaged checkpoint" in caplog.text
    assert checkpointing.saved_steps(workdir) == [2, 4, 6]  # step 4 trained and saved again
    second = losses_of(workdir)
    # Resumed from step 2: steps 3 and 4 again, with the same losses.
    np.testing.assert_allclose([second[s] for s in (3, 4)], [first[s] for s in (3, 4)], rtol=1e-5)

    # Deleted data files of a step without digests: the restore itself fails,
    # and that counts as damage too. All of them: which file holds the
    # parameters (all that evaluation reads) is up to Orbax's OCDBT layout.
    os.remove(os.path.join(workdir, "checkpoints_digests", "6.json"))
    data_files = [f for f in files_of(6) if f"{os.sep}d{os.sep}" in f]
    assert data_files
    for f in data_files:
        os.remove(f)
    with pytest.raises(ValueError, match=r"checkpoint .*/6 is damaged: restore failed"):
        checkpointing.load_stage(workdir)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trainer.train_and_evaluate(config(8), workdir)
    # Named by whichever read failed first: the arrays' metadata or the restore.
    assert re.search(r"checkpoints/6 is damaged: (restore failed|unreadable metadata)", caplog.text)
    third = losses_of(workdir)
    assert sorted(third) == list(range(1, 9))
    np.testing.assert_allclose([third[s] for s in (5, 6)], [second[s] for s in (5, 6)], rtol=1e-5)


def test_non_finite_loss_stops_with_its_step(demo, tmp_path):
    # An absurd learning rate overflows the weights after the first update.
    config = config_for(demo["full"], total_steps=4, **{"optimizer.learning_rate": 1e38})
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        trainer.train_and_evaluate(config, str(tmp_path / "a"))
    # Skipping keeps the weights; past max_skipped the run stops.
    config.nonfinite.skip_updates = True
    config.nonfinite.max_skipped = 1
    with pytest.raises(FloatingPointError, match=r"non-finite steps \(first at step 2\)"):
        trainer.train_and_evaluate(config, str(tmp_path / "b"))
    # Right after a resume, the error points at the checkpoint.
    resumed = str(tmp_path / "c")
    trainer.train_and_evaluate(config_for(demo["full"], total_steps=2), resumed)
    config = config_for(
        demo["full"], total_steps=4, log_every_steps=2, **{"optimizer.learning_rate": 1e38}
    )
    with pytest.raises(FloatingPointError, match="resumed from its step-2 checkpoint"):
        trainer.train_and_evaluate(config, resumed)
