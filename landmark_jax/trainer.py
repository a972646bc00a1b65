"""`train_and_evaluate(config, workdir)`: the training loop, top to bottom.

One device mesh over all devices of all processes; the train step is
`jax.jit` with the state donated and the global batch split on the 'data'
axis, so BatchNorm statistics are global-batch statistics. The head's class
dimension can be split over the same devices (`config.head.shard_classes`):
a 203,094-class head is then 1/8 per core on a v3-8. Random keys are folded
per step, and the data stream is a function of (seed, step), so a killed run
re-run with the same command continues with exactly the same losses.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from landmark_jax import config_lib
from landmark_jax.data import augmentation_settings, data_format, input_pipeline, shard_checks
from landmark_jax.models import backbone_checkpoint
from landmark_jax.retrieval import extract, validation
from landmark_jax.runtime import file_io, file_lease, sharding
from landmark_jax.training import preemption, step_fit, train_steps
from landmark_jax.workdir import (
    checkpoint_integrity,
    checkpoint_saving,
    checkpointing,
    metric_writer,
    run_config,
)

# ----------------------------------------------------------------------------
# Validation during training
# ----------------------------------------------------------------------------


def validate(
    config, mesh, state, program: train_steps.Program, stop_requested=lambda: False
) -> dict[str, float]:
    """Validation loss and top-1 accuracy on config.val.split, and the
    retrieval mAP@100 of config.val's queries when it names a solution.

    Raises:
      preemption.Abandoned: `stop_requested()` turned true during the pass
        (checked at each batch): a preemption notice leaves seconds, not the
        minutes a GLDv2 validation pass takes.
    """
    batch_size = config.val.batch_size or config.batch_size
    it, num_steps = input_pipeline.eval_iterator(
        config.data_dir,
        config.val.split,
        mesh=mesh,
        global_batch_size=batch_size,
        image_size=config.image_size,
    )
    totals = None
    for batch, _ in it:
        if stop_requested():
            raise preemption.Abandoned()
        sums = program.eval(state, batch, program.consts)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(int(totals["count"]), 1)
    metrics = {
        f"{config.val.split}_loss": float(totals["loss_sum"]) / count,
        f"{config.val.split}_accuracy": float(totals["correct"]) / count,
    }
    if config.val.retrieval_solution and not stop_requested():
        # The current parameters, through the evaluation's own extraction and
        # scoring (no second implementation).
        variables = train_steps.model_variables(state)
        current = extract.TrainedModel(config, "", int(state["step"]), program.model, variables, {})
        metrics["val_map@100"] = validation.retrieval_map(
            current,
            data_dir=config.data_dir,
            query_split=config.val.query_split,
            index_split=config.val.index_split,
            solution_path=config.val.retrieval_solution,
            mesh=mesh,
        )
    return metrics


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) a retrieval model in `workdir`.

    Args:
      config: a training config (see config_lib.base_config and configs/).
      workdir: where config.json, metrics.jsonl, TensorBoard events and
        checkpoints/ go. Re-running on the same workdir resumes from its
        latest checkpoint; a finished run returns at once.

    Returns:
      The metrics of the last log step (empty if the run was already done).

    Raises:
      ValueError: an invalid config (named key), data that disagree with it,
        or a checkpoint whose shapes do not fit (named parameter).
      FloatingPointError: a non-finite loss (with its step), or more skipped
        non-finite steps than config.nonfinite.max_skipped.
      file_lease.LeaseHeld: another trainer is running on `workdir` (named).
      file_lease.LeaseLost: this run's lease on a gs:// workdir lapsed and
        another trainer took it.
    """
    # --- Setup: mesh, checks before any compile, workdir ---------------------
    mesh = sharding.create_mesh()
    config_lib.validate_config(config, mesh.devices.size)
    # The model keys, the input convention of the weights included, are
    # settled here and recorded in config.json: later stages and evaluation
    # rebuild the model from that file.
    config = run_config.resolve_training_config(config)
    # The class set is recorded: a head padded to 1,024 rows fits another.
    label_map = run_config.resolve_classes(config)
    _check_splits(config)
    run_config.check_resume(config, workdir)
    # Fail now on a workdir that cannot be written or checkpointed to (named).
    file_io.checkpoint_path(workdir)
    # A finished run returns before anything is built or restored.
    finished = checkpointing.latest_step(workdir)
    if finished is not None and finished >= config.total_steps:
        logging.info("%s: already trained for %d steps", workdir, finished)
        return {}
    file_io.makedirs(workdir)
    # --- One trainer per workdir: a second launch stops here, at once ------
    with file_lease.workdir_lease(workdir) as lease:
        return _train_in_workdir(config, workdir, mesh, label_map, lease)


def _check_splits(config) -> None:
    """Every split the run will read exists, has a shard for each process, and
    holds in each shard this process reads the records dataset_info.json lists.

    Now, not at the first validation hours into the run (the train split's
    counts are checked when its stream is created).

    Raises:
      DataFormatError: a split is missing (named, with the build's splits), or
        a shard holds another number of records (named, with both counts).
      ValueError: fewer shards than processes (named).
    """
    splits = ["train"]
    if config.val.every_steps:
        splits.append(config.val.split)
        if config.val.retrieval_solution:
            splits += [config.val.query_split, config.val.index_split]
    for split in dict.fromkeys(splits):
        info = data_format.read_split_info(config.data_dir, split)
        files, counts = input_pipeline.process_files(info, jax.process_index(), jax.process_count())
        if split != "train":
            shard_checks.verify_counts(files, counts, f"split {split!r} of {config.data_dir}")


def _nonfinite_message(first: int, resumed, start_step: int, changes, config) -> str:
    """What a non-finite loss at step `first` most likely comes from, and what to do."""
    advice = (
        "set config.nonfinite.skip_updates=True to skip such steps, or lower "
        f"config.optimizer.learning_rate (now {config.optimizer.learning_rate!r})"
    )
    if resumed is None or first > start_step + config.log_every_steps:
        return f"non-finite loss at step {first}; {advice}"
    # Right after a resume: the checkpoint, or what changed since it was saved.
    verdict = resumed.verdict
    if verdict.status == checkpoint_integrity.VERIFIED:
        checkpoint = f"its files match the digests recorded when it was saved ({verdict.evidence})"
    else:
        checkpoint = f"it was not verified ({verdict.evidence})"
    if changes:
        cause = (
            "the config changed since that checkpoint was written, the likely cause:\n  "
            + "\n  ".join(changes)
        )
    else:
        cause = "the config is the one that wrote it"
    return (
        f"non-finite loss at step {first}, {first - start_step} step(s) after resuming from "
        f"the step-{start_step} checkpoint; {checkpoint}; {cause}\n{advice}"
    )


def _step_zero_state(config, program: train_steps.Program, backbone_variables) -> Any:
    """A new run's state: initialised on the mesh, then the weights of
    config.init.checkpoint (a previous stage) or config.init.backbone."""
    # What is loaded is left out of the random initialisation.
    if config.init.checkpoint:
        if config.init.carry == "all":
            run_config.check_classes(
                run_config.read_run_config(config.init.checkpoint),
                config,
                f"config.init.checkpoint={config.init.checkpoint!r} (init.carry='all')",
            )
        stage = checkpointing.load_stage(config.init.checkpoint, "config.init.checkpoint")
        state = program.initial_state(checkpointing.carried_paths(config.init.carry))
        state = checkpointing.carry_over(state, stage, config.init.carry, config.init.checkpoint)
        logging.info("Initialised from %s (carry=%s)", config.init.checkpoint, config.init.carry)
    elif backbone_variables is not None:
        state = program.initial_state([checkpointing.BACKBONE_PATH])
        state = checkpointing.load_backbone_weights(state, backbone_variables, config.init.backbone)
        logging.info("Initialised the backbone from %s", config.init.backbone)
    else:
        state = program.initial_state()
    return state


def _train_in_workdir(config, workdir, mesh, label_map, lease) -> dict[str, float]:
    """train_and_evaluate once its checks passed and it holds the workdir."""
    writer = metric_writer.MetricWriter(workdir)

    # --- Model, head, loss constants, optimizer and the jitted steps ---------
    program = train_steps.build_program(config, mesh, label_map)
    # A step the devices cannot hold stops here, naming the keys to change.
    step_fit.check_step_fits(program, config, mesh)
    backbone_variables = (
        backbone_checkpoint.load_backbone_checkpoint(config.init.backbone)
        if config.init.backbone
        else None
    )

    # --- State: resume, or initialise sharded then carry over / import ----
    manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
    # What changed since the checkpoint: named if it no longer fits, or if
    # the loss turns non-finite right after the resume.
    changes = run_config.changes_since_checkpoint(config, workdir)
    # A resume restores into the abstract state: it neither compiles nor
    # runs the initialisation, and never holds two copies of the state.
    resumed = checkpointing.restore_latest(manager, program.abstract, changes)
    if resumed is not None:
        state = resumed.state
        logging.info("Resumed %s at step %d", workdir, resumed.step)
    else:
        state = _step_zero_state(config, program, backbone_variables)
    start_step = int(state["step"])
    if jax.process_index() == 0:
        # Written once the state fits the model (a failed restore leaves the
        # workdir's record as it was).
        run_config.write_run_config(config, workdir)
    writer.truncate_after(start_step)
    if start_step >= config.total_steps:
        logging.info("%s: already trained for %d steps", workdir, start_step)
        manager.close()
        return {}

    # --- Input -----------------------------------------------------------------
    batches = input_pipeline.train_iterator(
        config.data_dir,
        mesh=mesh,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=start_step,
        files_per_chunk=config.input.files_per_chunk,
        shuffle_buffer=config.input.shuffle_buffer,
        augmentation=augmentation_settings.from_config(config.input),
    )

    # --- Loop: step, log, validate, checkpoint --------------------------------
    # SIGTERM (one process) or JAX's preemption sync point (several): save, stop.
    # Closing the manager on any way out lets a save in flight finish; closing
    # the input stream releases its tf.data iterator (threads, buffers, open
    # shards) there and then, not whenever the garbage collector reaches a
    # failed run's traceback.
    with (
        contextlib.closing(manager),
        contextlib.closing(batches),
        preemption.PreemptionNotice(manager) as notice,
    ):
        progress = metric_writer.Progress(config.total_steps, start_step)
        sums, num_summed, last = None, 0, {}
        pending: set[int] = set()  # saved by this run, integrity not yet recorded

        def save(step: int, force: bool) -> None:
            if lease is not None:
                lease.verify()  # a run whose lease lapsed must not write over another's
            checkpoint_saving.save(manager, step, state, force)
            pending.add(step)
            # The records of the steps finalized so far (this one once it is).
            checkpoint_saving.record_integrity(manager, pending)

        for step in range(start_step + 1, config.total_steps + 1):
            state, metrics = program.step(state, next(batches), program.consts)
            # Accumulated on the device: nothing here waits for the step to finish.
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            num_summed += 1
            is_last = step == config.total_steps
            do_log = step % config.log_every_steps == 0 or is_last
            do_validate = config.val.every_steps and (step % config.val.every_steps == 0 or is_last)
            do_save = step % config.checkpoint_every_steps == 0 or is_last
            preempted = notice.reached(step)
            if not (do_log or do_validate or do_save or preempted):
                continue

            nonfinite = jax.device_get(state["nonfinite"])
            if not config.nonfinite.skip_updates and nonfinite["count"] > 0:
                first = int(nonfinite["first_step"]) + 1
                raise FloatingPointError(
                    _nonfinite_message(first, resumed, start_step, changes, config)
                )
            if nonfinite["count"] > config.nonfinite.max_skipped:
                raise FloatingPointError(
                    f"{int(nonfinite['count'])} non-finite steps (first at step "
                    f"{int(nonfinite['first_step']) + 1}) > config.nonfinite.max_skipped="
                    f"{config.nonfinite.max_skipped}"
                )
            if do_log:
                last = {k: float(v) / num_summed for k, v in jax.device_get(sums).items()}
                images_per_sec, line = progress.tick(step, config.batch_size)
                last.update(
                    learning_rate=float(program.schedule(step - 1)),
                    images_per_sec=images_per_sec,
                    skipped_steps=int(nonfinite["count"]),
                )
                sums, num_summed = None, 0
            # Saved before the validation pass, so that a pass that fails or
            # is cut short by a preemption notice loses no training.
            if do_save or preempted:
                save(step, preempted)
            if do_validate and not preempted:
                try:
                    last.update(validate(config, mesh, state, program, notice.received))
                except preemption.Abandoned:
                    logging.warning("Preemption notice during validation at step %d", step)
                    preempted = True
                except Exception:
                    if not do_save:
                        save(step, True)
                    checkpoint_saving.wait_until_finished(manager)
                    checkpoint_saving.record_integrity(manager, pending)
                    raise
                if preempted and not do_save:
                    save(step, True)
            if do_log or do_validate:
                writer.write(step, last)
                logging.info(
                    "%s | %s",
                    line if do_log else f"step {step}",
                    ", ".join(f"{k} {v:.4g}" for k, v in last.items()),
                )
            if preempted:
                checkpoint_saving.wait_until_finished(manager)
                checkpoint_saving.record_integrity(manager, pending)
                logging.warning("Preempted at step %d: checkpoint saved", step)
                raise preemption.Preempted(step, workdir)
        checkpoint_saving.wait_until_finished(manager)
        checkpoint_saving.record_integrity(manager, pending)
    return last
