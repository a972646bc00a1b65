"""A run's compiled program, built from its config: model, head, optimizer,
initial state and the jitted train and eval steps.

`build_program(config, mesh, label_map)` is what the trainer runs and what
the benchmarks (experiments/benchmarks/) time, so a benchmark measures the
real step: its model, its cosine head over the data's classes, its loss
weights and margins, its sharding. The train step is `jax.jit` over one
device mesh with the state donated and the global batch split on the 'data'
axis (BatchNorm statistics are global-batch statistics); the head's class
dimension can be split over the same devices (`config.head.shard_classes`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from landmark_jax.data import data_format
from landmark_jax.models.factory import create_model
from landmark_jax.runtime import sharding
from landmark_jax.training import head_sharding, heads, losses, random_streams

# ----------------------------------------------------------------------------
# Building blocks: model, optimizer, state
# ----------------------------------------------------------------------------


def build_optimizer(cfg: ml_collections.ConfigDict, total_steps: int | None):
    """(optax transformation, learning-rate schedule) from config.optimizer."""
    lr = cfg.learning_rate
    if cfg.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif cfg.schedule == "inverse_time":
        # Keras SGD(decay=d), as in the GLR2020 code: lr_t = lr / (1 + d * t).
        schedule = lambda t: lr / (1.0 + cfg.decay * t)  # noqa: E731
    else:
        length = cfg.schedule_steps or total_steps
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, max(cfg.warmup_steps, 1), max(length, cfg.warmup_steps + 1)
        )
    if cfg.name == "sgd":
        tx = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
        if cfg.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    elif cfg.name == "adam":
        tx = optax.adam(schedule)
        if cfg.weight_decay:  # PyTorch Adam(weight_decay): L2 added to the gradient
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    else:
        tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    if cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx, schedule


def model_variables(state: Any) -> dict[str, Any]:
    """The model's variables ({'params', 'batch_stats'}) of a train state.

    The state (built by `init_state` in `build_program`) keeps the model's
    variables under params/model and batch_stats/model, and the head's under
    params/head. Also takes a restored stage (checkpointing.load_stage),
    which has the same layout.
    """
    return {"params": state["params"]["model"], "batch_stats": state["batch_stats"]["model"]}


# ----------------------------------------------------------------------------
# The train and eval steps
# ----------------------------------------------------------------------------


def _logits(config, cosine, labels, consts, num_classes, valid_mask=None):
    hc = config.head
    scale = heads.compute_scale(
        hc.scale,
        num_classes=num_classes,
        scale=hc.scale_value,
        cosine=cosine,
        labels=labels,
        valid_mask=valid_mask,
    )
    margin = consts["margins"][labels] if hc.dynamic_margins else hc.margin
    logits = heads.margin_logits(
        cosine,
        labels,
        margin_type=hc.margin_type,
        margin=margin,
        scale=scale,
        easy_margin=hc.easy_margin,
    )
    return logits, scale


def train_step(state, batch, consts, *, model, head, tx, config, num_classes, base_key):
    """One SGD step on a global batch; returns (new state, metrics)."""
    step = state["step"]
    key = random_streams.step_key(base_key, step)

    def loss_fn(params):
        variables = model_variables({**state, "params": params})
        embeddings, updates = model.apply(
            variables, batch["image"], train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        cosine = head.apply({"params": params["head"]}, embeddings)
        logits, scale = _logits(config, cosine, batch["label"], consts, num_classes)
        weights = losses.sample_weights(
            batch["label"], batch["is_clean"], consts["class_weights"], config.loss.not_clean_weight
        )
        loss, _ = losses.weighted_cross_entropy(logits, batch["label"], weights)
        accuracy = losses.accuracy(cosine, batch["label"])
        return loss, (updates["batch_stats"], scale, accuracy)

    (loss, (batch_stats, scale, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"]
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = {
        "step": step + 1,
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": {**state["batch_stats"], "model": batch_stats},
        "opt_state": opt_state,
    }
    nonfinite = state["nonfinite"]
    if config.nonfinite.skip_updates:
        # Keep the old weights on a bad step; the loop stops past max_skipped.
        kept = {k: v for k, v in state.items() if k in ("params", "batch_stats", "opt_state")}
        new.update(
            jax.tree.map(lambda n, o: jnp.where(finite, n, o), {k: new[k] for k in kept}, kept)
        )
    new["nonfinite"] = {
        "count": nonfinite["count"] + (~finite).astype(jnp.int32),
        "first_step": jnp.where(
            (nonfinite["first_step"] < 0) & ~finite, step, nonfinite["first_step"]
        ),
    }
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm, "scale": scale}
    return new, metrics


def eval_step(state, batch, consts, *, model, head, config, num_classes):
    """Sums of weighted loss and correct predictions over the valid rows."""
    embeddings = model.apply(model_variables(state), batch["image"])
    cosine = head.apply({"params": state["params"]["head"]}, embeddings)
    mask = batch["mask"]
    logits, _ = _logits(config, cosine, batch["label"], consts, num_classes, valid_mask=mask)
    _, per_example = losses.weighted_cross_entropy(
        logits, batch["label"], jnp.ones_like(logits[:, 0]), valid_mask=mask
    )
    correct = (jnp.argmax(cosine, -1) == batch["label"]) & mask
    return {
        "loss_sum": jnp.sum(jnp.where(mask, per_example, 0.0)),
        "correct": jnp.sum(correct),
        "count": jnp.sum(mask),
    }


# ----------------------------------------------------------------------------
# The program: everything the loop compiles, in one place
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
    """A run's model and compiled steps.

    Attributes:
      model: the retrieval model (factory.create_model).
      head: the cosine classifier over the data's classes.
      consts: the per-class loss constants, replicated on the mesh.
      schedule: the learning rate as a function of the step (0-based).
      keys: the run's random streams.
      shardings: the state's shardings (a pytree like the state).
      abstract: the state's shapes, dtypes and shardings, for restores.
      init: `init(model_key, head_key) -> state`, traceable (initial_state
        jits it).
      step: jitted `step(state, batch, consts) -> (state, metrics)`, state donated.
      eval: jitted `eval(state, batch, consts) -> sums` over a masked batch.
    """

    model: Any
    head: heads.CosineClassifier
    consts: dict[str, jax.Array]
    schedule: Callable[[Any], Any]
    keys: random_streams.RunKeys
    shardings: Any
    abstract: Any
    init: Callable[..., Any]
    step: Callable[..., Any]
    eval: Callable[..., Any]
    # initial_state's jitted inits, by the subtrees they leave out.
    jitted_inits: dict[tuple, Callable[..., Any]] = dataclasses.field(default_factory=dict)

    def initial_state(self, leave_out: Sequence[tuple[str, ...]] = ()) -> dict[str, Any]:
        """The step-0 state of the run's seed, sharded on the mesh.

        A stage that starts from loaded weights (converted backbone weights,
        a previous stage) leaves them out: their random draws are neither
        compiled nor run (the init of an efficientnet_tiny whose backbone is
        loaded compiled on a CPU in 0.35 s instead of 7.8 s), and every
        other leaf is bit for bit what the whole initialisation gives it.

        Args:
          leave_out: paths below 'params' and 'batch_stats' (e.g.
            ('model', 'backbone'), as checkpointing.carry_over and
            load_backbone_weights fill them) that the caller fills with
            loaded weights.

        Returns:
          The state; the left-out subtrees hold `abstract`'s
          jax.ShapeDtypeStruct leaves (shapes, dtypes and shardings) until
          filled.
        """
        leave_out = tuple(sorted({tuple(path) for path in leave_out}))
        if leave_out not in self.jitted_inits:

            def init_without(model_key, head_key):
                return _without(self.init(model_key, head_key), leave_out)

            self.jitted_inits[leave_out] = jax.jit(
                init_without, out_shardings=_without(self.shardings, leave_out)
            )
        state = self.jitted_inits[leave_out](self.keys.model, self.keys.head)
        return _with(state, self.abstract, leave_out)


_COLLECTIONS = ("params", "batch_stats")


def _without(state: dict, paths: tuple[tuple[str, ...], ...]) -> dict:
    """`state` less its subtrees at each path below params and batch_stats."""

    def drop(tree, path):
        key, *rest = path
        if not isinstance(tree, dict) or key not in tree:
            return tree
        if not rest:
            return {k: v for k, v in tree.items() if k != key}
        return {**tree, key: drop(tree[key], rest)}

    new = dict(state)
    for collection in _COLLECTIONS:
        for path in paths:
            new[collection] = drop(new[collection], path)
    return new


def _with(state: dict, source: dict, paths: tuple[tuple[str, ...], ...]) -> dict:
    """`state` with `source`'s subtrees at each path `_without` removed."""

    def add(tree, full, path):
        key, *rest = path
        if not isinstance(full, dict) or key not in full:
            return tree
        if not rest:
            return {**tree, key: full[key]}
        return {**tree, key: add(tree.get(key, {}), full[key], rest)}

    new = dict(state)
    for collection in _COLLECTIONS:
        for path in paths:
            new[collection] = add(new[collection], source[collection], path)
    return new


# The config keys a program reads. Two runs whose keys agree (a resumed run,
# a rerun in the same notebook or test process) share one built program: its
# jitted init and steps are traced and compiled once per process.
_PROGRAM_KEYS = ("model", "head", "loss", "optimizer", "nonfinite", "seed", "image_size")
_PROGRAMS_KEPT = 8
_programs: collections.OrderedDict[tuple, Program] = collections.OrderedDict()


def program_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of the keys of `config` its program reads, and nothing else.

    total_steps is one of them only where the learning-rate schedule's
    length comes from it (a warmup-cosine schedule without schedule_steps).
    """
    keys = list(_PROGRAM_KEYS)
    schedule = config.optimizer.schedule
    if schedule not in ("constant", "inverse_time") and not config.optimizer.schedule_steps:
        keys.append("total_steps")
    return ml_collections.ConfigDict(copy.deepcopy({k: config[k] for k in keys}))


def build_program(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    label_map: data_format.LabelMap,
) -> Program:
    """Builds the model, head, optimizer and jitted steps of `config`.

    Nothing is compiled or initialised here: `program.initial_state()` and
    the first `program.step` call do that. The last few programs built are
    kept, keyed by `program_config(config)`, the mesh and the class count,
    so a second run of the same program in this process reuses its traced
    and compiled steps; the per-class constants are computed anew each time.

    Args:
      config: a resolved training config (run_config.resolve_training_config).
      mesh: the device mesh ('data' axis over every device).
      label_map: the data's classes and their counts (data_format.read_label_map).

    Returns:
      The program.
    """
    pc = program_config(config)
    key = (pc.to_json(sort_keys=True), mesh, label_map.num_classes)
    if key in _programs:
        _programs.move_to_end(key)
    else:
        _programs[key] = _build_parts(pc, mesh, label_map.num_classes)
        while len(_programs) > _PROGRAMS_KEPT:
            _programs.popitem(last=False)
    parts = _programs[key]
    # Per-class arrays the loss indexes by label (class weights and margins
    # from the train + val counts, see losses.py), placed on the devices once.
    consts = sharding.replicate(
        losses.per_class_constants(
            label_map,
            class_weight_mode=config.loss.class_weights,
            not_clean_weight=config.loss.not_clean_weight,
            margin_a=config.head.margin_a,
            margin_b=config.head.margin_b,
        ),
        mesh,
    )
    return dataclasses.replace(parts, consts=consts)


def _build_parts(config, mesh, num_classes: int) -> Program:
    """The model, head, optimizer and jitted steps of a program_config
    (a Program whose consts build_program fills in)."""
    model = create_model(config.model)
    shard_head = config.head.shard_classes and mesh.devices.size > 1
    head = heads.CosineClassifier(
        num_classes=num_classes,
        num_subcenters=config.head.num_subcenters,
        num_classes_padded=head_sharding.portable_num_classes(num_classes),
        mesh=mesh if shard_head else None,
        kernel_init=config.head.init,
    )
    # total_steps is in a program_config only where the schedule reads it.
    tx, schedule = build_optimizer(config.optimizer, config.get("total_steps"))
    # Two streams: one for initialisation, one folded with the step number.
    keys = random_streams.run_keys(config.seed)

    def init_state(model_key, head_key):
        variables = random_streams.init_model_variables(model, model_key, config.image_size)
        embedding = jnp.zeros((1, config.model.embedding_dim), jnp.float32)
        params = {"model": variables["params"], "head": head.init(head_key, embedding)["params"]}
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": {"model": variables["batch_stats"]},
            "opt_state": tx.init(params),
            "nonfinite": {
                "count": jnp.zeros((), jnp.int32),
                "first_step": -jnp.ones((), jnp.int32),
            },
        }

    abstract = jax.eval_shape(init_state, keys.model, keys.head)
    shardings = head_sharding.param_shardings(abstract, mesh, shard_head)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    step = jax.jit(
        functools.partial(
            train_step,
            model=model,
            head=head,
            tx=tx,
            config=config,
            num_classes=num_classes,
            base_key=keys.steps,
        ),
        donate_argnums=0,
        out_shardings=(shardings, sharding.replicated_sharding(mesh)),
    )
    evaluate = jax.jit(
        functools.partial(eval_step, model=model, head=head, config=config, num_classes=num_classes)
    )
    return Program(
        model=model,
        head=head,
        consts={},
        schedule=schedule,
        keys=keys,
        shardings=shardings,
        abstract=abstract,
        init=init_state,
        step=step,
        eval=evaluate,
    )
