"""train_steps.build_program: one built program per program config."""

import numpy as np
import pytest
from configs_for_tests import load_config, set_keys

from landmark_jax.data import data_format
from landmark_jax.runtime import sharding
from landmark_jax.training import train_steps
from landmark_jax.workdir import run_config


def _label_map(counts) -> data_format.LabelMap:
    counts = np.asarray(counts, np.int64)
    return data_format.LabelMap(
        landmark_ids=np.arange(len(counts), dtype=np.int64),
        counts=counts,
        clean_counts=counts,
        train_val_counts=counts,
        train_val_clean_counts=counts,
    )


def _config(**keys):
    return run_config.resolve_training_config(set_keys(load_config("demo", "smoke"), **keys))


@pytest.fixture(scope="module")
def mesh():
    return sharding.create_mesh()


def test_a_second_build_of_the_same_program_reuses_its_steps(mesh):
    config = _config(**{"optimizer.schedule": "constant"})
    first = train_steps.build_program(config, mesh, _label_map([3, 4, 5]))
    # Keys the program does not read (the run's length under a constant
    # learning rate, logging, data) do not make another program.
    again = _config(
        total_steps=99,
        log_every_steps=7,
        data_dir="/elsewhere",
        **{"optimizer.schedule": "constant"},
    )
    second = train_steps.build_program(again, mesh, _label_map([6, 1, 5]))
    assert (second.step, second.init, second.eval) == (first.step, first.init, first.eval)
    # The per-class constants are the new data's (class weights ~ 1/ln n_c).
    assert not np.allclose(first.consts["class_weights"], second.consts["class_weights"])


@pytest.mark.parametrize(
    "key, value",
    [
        ("optimizer.learning_rate", 0.5),
        ("head.margin", 0.3),
        ("model.embedding_dim", 16),
        ("seed", 1),
        ("image_size", 40),
    ],
)
def test_a_key_the_program_reads_builds_another(mesh, key, value):
    base = train_steps.build_program(_config(), mesh, _label_map([3, 4, 5]))
    other = train_steps.build_program(_config(**{key: value}), mesh, _label_map([3, 4, 5]))
    assert other.step is not base.step and other.init is not base.init


def test_the_schedule_length_counts_only_where_the_schedule_reads_it(mesh):
    labels = _label_map([3, 4, 5])

    def step_of(**keys):
        return train_steps.build_program(_config(**keys), mesh, labels).step

    cosine = {"optimizer.schedule": "warmup_cosine", "optimizer.schedule_steps": None}
    assert step_of(total_steps=10, **cosine) is not step_of(total_steps=20, **cosine)
    fixed_length = {"optimizer.schedule": "warmup_cosine", "optimizer.schedule_steps": 50}
    assert step_of(total_steps=10, **fixed_length) is step_of(total_steps=20, **fixed_length)
    inverse_time = {"optimizer.schedule": "inverse_time"}
    assert step_of(total_steps=10, **inverse_time) is step_of(total_steps=20, **inverse_time)


def test_a_config_changed_after_the_build_leaves_the_program_as_built(mesh):
    config = _config(**{"optimizer.learning_rate": 0.25, "optimizer.schedule": "constant"})
    program = train_steps.build_program(config, mesh, _label_map([3, 4, 5]))
    config.optimizer.learning_rate = 1e9
    assert float(program.schedule(0)) == 0.25
    # And the next build of the changed config is another program.
    changed = train_steps.build_program(config, mesh, _label_map([3, 4, 5]))
    assert changed.step is not program.step and float(changed.schedule(0)) == 1e9


def test_an_initial_state_leaves_out_what_a_stage_loads_and_draws_the_rest_the_same(mesh):
    """A stage loading its backbone (or a whole previous stage) neither
    compiles nor runs the random draws of what it loads; every other leaf is
    bit for bit the whole initialisation's."""
    import jax

    program = train_steps.build_program(_config(), mesh, _label_map([3, 4, 5]))
    full = program.initial_state()
    flat_full = dict(jax.tree_util.tree_flatten_with_path(full)[0])
    abstract = dict(jax.tree_util.tree_flatten_with_path(program.abstract)[0])

    def threefry_calls(leave_out):
        program.initial_state(leave_out)  # jits (and caches) the variant
        key = tuple(sorted(leave_out))
        lowered = program.jitted_inits[key].lower(program.keys.model, program.keys.head)
        return lowered.as_text().count("call @threefry2x32")

    def under(path, prefix):
        names = tuple(getattr(p, "key", None) for p in path)
        return names[0] in ("params", "batch_stats") and names[1 : 1 + len(prefix)] == prefix

    draws = {(): threefry_calls(())}
    for leave_out in ([("model", "backbone")], [("model",), ("head",)]):
        state = program.initial_state(leave_out)
        flat = dict(jax.tree_util.tree_flatten_with_path(state)[0])
        assert flat.keys() == flat_full.keys()
        for path, leaf in flat.items():
            if any(under(path, prefix) for prefix in leave_out):
                assert isinstance(leaf, jax.ShapeDtypeStruct), path
                assert leaf == abstract[path], path
            else:
                assert leaf.sharding == flat_full[path].sharding, path
                np.testing.assert_array_equal(leaf, flat_full[path], err_msg=str(path))
        draws[tuple(leave_out)] = threefry_calls(leave_out)
    # The head's and the neck's draws stay; the backbone's go; nothing is
    # drawn where everything is loaded.
    assert draws[()] > draws[(("model", "backbone"),)] > draws[(("model",), ("head",))] == 0, draws
