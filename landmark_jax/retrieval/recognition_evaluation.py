"""Recognition evaluation: kNN votes, classifier fusion, the non-landmark penalty, GAP.

Each test image takes the landmark its nearest train images vote for
(retrieval/recognition.py), optionally fused with the trained head's top
classes, its score lowered by its similarity to known non-landmark images
when a split of them is named (retrieval/non_landmarks.py). Scored by GAP,
with the top-1 accuracy of each labeller on the images with ground truth.
`evaluation.evaluate` calls `evaluate_recognition` after extraction, when
`recognition_requested` (a solution scores it, or its submission is asked for).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from landmark_jax.data import data_format
from landmark_jax.retrieval import (
    ensemble,
    extract,
    knn,
    recognition,
    rerank,
    rerank_evaluation,
    solutions,
    usage_metrics,
)
from landmark_jax.retrieval import non_landmarks as non_landmark_penalty
from landmark_jax.runtime import file_io
from landmark_jax.training import heads


def recognition_requested(config: ml_collections.ConfigDict) -> bool:
    """Whether the evaluation labels the test images (embedding eval.train_split).

    Only when something reads the labels: eval.recognition_solution scores
    them, or eval.recognition_submission asks for recognition_submission.csv
    without a solution. Otherwise the train split (GLDv2's 4.1M images) is
    never embedded; eval.train_split='' turns recognition off altogether.

    Args:
      config: the evaluation config (its `eval` block).

    Returns:
      True when evaluate_recognition runs.
    """
    ec = config.eval
    return bool(
        ec.index_split and ec.train_split and (ec.recognition_solution or ec.recognition_submission)
    )


def first_member_embeddings(
    combined: extract.Embeddings, members: Sequence[ensemble.EnsembleMember], dim: int
) -> np.ndarray:
    """The first member's own unit embeddings, out of the weighted concatenation.

    combine_embeddings writes member 0's unit rows times its weight into the
    first `dim` columns (and does not renormalise), so they divide back out.
    """
    return combined.embeddings[:, :dim] / members[0].weight


def classifier_inputs(config, test, members, first_model, mesh) -> np.ndarray:
    """The first member's unit embeddings of the test split, which its head
    scores: out of the (ensemble) descriptors when they are embeddings,
    else (model.descriptor='pooled') extracted once more as embeddings,
    without SuperGlobal's pooling options (eval.gem_plus ...), which serve
    the descriptor: the head scores the embedding it was trained on."""
    if first_model.config.model.descriptor == "embedding":
        return first_member_embeddings(test, members, first_model.config.model.embedding_dim)
    options = {
        **extract.extraction_options(config, first_model, members[0].image_size),
        "descriptor": "embedding",
        "superglobal": None,
    }
    own = extract.extract(
        first_model, config.eval.test_split, data_dir=config.data_dir, mesh=mesh, **options
    )
    # In the test descriptors' row order.
    _, (_, aligned) = ensemble.align_by_ids(
        [(test.ids, np.zeros((len(test.ids), 0))), (own.ids, own.embeddings)]
    )
    return aligned


def nearest_cosines(
    queries: np.ndarray, reference: np.ndarray, k: int, backend: str, squared_norm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest reference rows and their cosines, as recognition votes with them.

    Args:
      queries: [Q, D] descriptors.
      reference: [N, D] descriptors (train or non-landmark images).
      k: neighbours (at most N are returned).
      backend: eval.knn_backend.
      squared_norm: every row's squared norm (an ensemble's sum of squared
        weights; 1 for one run): squared L2 d^2 -> cosine 1 - d^2 / (2 norm).

    Returns:
      (neighbours [Q, k'] int64, -1 for none; cosines [Q, k'], 0 for none).
    """
    scores, neighbors = knn.search(queries, reference, min(k, len(reference)), backend)
    return neighbors, np.where(neighbors >= 0, 1.0 - scores / (2.0 * squared_norm), 0.0)


def head_top_m(
    model: extract.TrainedModel,
    embeddings: np.ndarray,
    class_landmarks: np.ndarray,
    m: int,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """The trained head's top-m landmarks and cosines for unit embeddings.

    The head module itself scores the embeddings on the devices (the cosine
    to each class, the max over its sub-centers, padded classes at the
    sentinel), in chunks of queries so a 203,094-class head never needs a
    [Q, C] matrix on the host.

    Args:
      model: the restored run (its head_params and head config).
      embeddings: [Q, D] unit embeddings.
      class_landmarks: [C] landmark id of each contiguous label.
      m: how many classes to keep per query.
      chunk: queries per device call.

    Returns:
      ([Q, m] landmark ids, [Q, m] cosines), best first.
    """
    kernel = model.head_params[heads.KERNEL_KEY]
    k = model.config.head.num_subcenters
    num_classes = len(class_landmarks)
    head = heads.CosineClassifier(
        num_classes=num_classes, num_subcenters=k, num_classes_padded=kernel.shape[1] // k
    )
    params = jax.device_put({"params": model.head_params})
    score = jax.jit(lambda p, x: head.apply(p, x)[:, :num_classes])  # drop padded classes
    labels, scores = [], []
    for start in range(0, len(embeddings), chunk):
        cos = np.asarray(score(params, embeddings[start : start + chunk]))
        top = recognition.classifier_top_m(cos, class_landmarks, m=m)
        labels.append(top[0])
        scores.append(top[1])
    return np.concatenate(labels), np.concatenate(scores)


def evaluate_recognition(
    config: ml_collections.ConfigDict,
    out_dir: str,
    test: extract.Embeddings,
    train: extract.Embeddings,
    non_landmarks: extract.Embeddings | None,
    members: Sequence[ensemble.EnsembleMember],
    first_model: extract.TrainedModel,
    mesh: Any,
    writes: bool,
) -> dict[str, Any]:
    """Labels the test images, writes the submission and scores it.

    With eval.rerank and eval.rerank_recognition, the kNN vote uses the
    neighbours each re-ranking step gives (the train split as the index; its
    self-search kept in out_dir): every ranking is scored, the last one
    submitted. The classifier's top classes and the non-landmark penalty's
    neighbours are the same for every ranking.

    Args:
      config: the evaluation config (data_dir, eval.*).
      out_dir: where recognition_submission.csv goes.
      test, train: the (ensemble) descriptors of the test and train splits.
      non_landmarks: those of eval.non_landmark_split, or None.
      members: the ensemble members (one for a single run).
      first_model: the first member's restored run, whose head classifies.
      mesh: the device mesh (the head's inputs may need an extraction).
      writes: whether this process writes files (process 0).

    Returns:
      Metrics for metrics.json: with eval.recognition_solution, `gap`,
      `recognition` (per usage), `recognition_queries`, `recognition_top1`
      (kNN, classifier, and fused with eval.classifier_fusion), with a
      non-landmark split `gap_without_non_landmark_penalty`, and with
      re-ranking `rerank` ({'recognition': {label: {'gap', 'seconds'}}}).
    """
    ec, metrics = config.eval, {}
    label_map = data_format.read_label_map(config.data_dir)
    # Squared L2 -> cosine. Every (ensemble) row has squared norm
    # sum(w_i^2), so this is the weighted mean of the members' cosines.
    norm2 = sum(m.weight**2 for m in members)

    def nearest(reference, k: int) -> tuple[np.ndarray, np.ndarray]:
        return nearest_cosines(test.embeddings, reference.embeddings, k, ec.knn_backend, norm2)

    # (label, neighbours, cosines, seconds) of each ranking the vote uses.
    if ec.rerank and ec.rerank_recognition:
        rankings = [
            (
                r.label,
                r.neighbors,
                np.where(r.neighbors >= 0, 1.0 - r.distances / 2.0, 0.0),
                r.seconds,
            )
            for r in rerank_evaluation.searches(
                test.embeddings,
                train.embeddings,
                rerank.parse_steps(ec.rerank),
                min(ec.recognition_k, len(train.ids)),
                ec.knn_backend,
                file_io.join(
                    out_dir, rerank_evaluation.NEIGHBOURS_FILE.format(split=ec.train_split)
                ),
                writes,
            )
        ]
    else:
        rankings = [("first stage", *nearest(train, ec.recognition_k), None)]
    classifier = None
    if ec.classifier_fusion or ec.recognition_solution:
        classifier = head_top_m(
            first_model,
            classifier_inputs(config, test, members, first_model, mesh),
            label_map.landmark_ids,
            ec.classifier_top_m,
        )
    penalty_cosine = None
    if non_landmarks is not None:
        # Unset: as many neighbours as the landmark vote, on the same scale.
        _, penalty_cosine = nearest(non_landmarks, ec.non_landmark_k or ec.recognition_k)

    # Every ranking labelled (and, re-ranked, scored); the last one is submitted.
    solution = ec.recognition_solution and solutions.read_recognition_solution(
        ec.recognition_solution
    )
    scored = {}
    for label, neighbors, cosine, seconds in rankings:
        predictions, unpenalized, top1 = _labels(
            ec,
            test.ids,
            neighbors,
            cosine,
            label_map.landmark_ids[train.labels],
            classifier,
            penalty_cosine,
        )
        if solution and seconds is not None:
            by_usage = usage_metrics.recognition_metrics_by_usage(predictions, solution)
            scored[label] = {"gap": by_usage[solutions.ALL]["gap"], "seconds": seconds}
    if scored:
        metrics["rerank"] = {"recognition": scored}
    if writes:
        solutions.write_recognition_submission(
            file_io.join(out_dir, "recognition_submission.csv"),
            predictions,
            all_ids=list(test.ids),
        )
    if ec.recognition_solution:
        solution, by_usage, metrics["recognition_queries_missing"] = (
            usage_metrics.score_against_solution(
                "recognition", ec.recognition_solution, predictions, test.ids
            )
        )
        metrics["gap"] = by_usage[solutions.ALL]["gap"]
        metrics["recognition"] = by_usage
        if non_landmarks is not None:
            without = usage_metrics.recognition_metrics_by_usage(unpenalized, solution)
            metrics["gap_without_non_landmark_penalty"] = without[solutions.ALL]["gap"]
        metrics["recognition_queries"] = sum(
            1 for gt in solutions.merged_usages(solution).values() if gt
        )
        metrics["recognition_top1"] = {
            name: usage_metrics.recognition_metrics_by_usage(
                recognition.recognition_predictions(list(test.ids), chosen, np.zeros(len(chosen))),
                solution,
            )[solutions.ALL]["top1_accuracy"]
            for name, chosen in top1.items()
        }
    return metrics


def _labels(ec, test_ids, neighbors, cosine, train_landmarks, classifier, penalty_cosine):
    """(predictions, predictions without the non-landmark penalty, each
    labeller's top-1 labels) of the test images from their train neighbours
    (and the classifier's top classes, the non-landmark neighbours' cosines)."""
    neighbor_landmarks = recognition.neighbor_landmarks(neighbors, train_landmarks)
    knn_labels, knn_scores = recognition.knn_vote(
        neighbor_landmarks, cosine, power=ec.recognition_power
    )
    top1 = {"knn": knn_labels}
    if classifier is not None:
        top1["classifier"] = classifier[0][:, 0]
    if ec.classifier_fusion:
        labels, label_scores = recognition.fuse_with_classifier(
            neighbor_landmarks,
            cosine,
            *classifier,
            knn_power=ec.recognition_power,
            classifier_power=ec.classifier_power,
        )
        top1["fused"] = labels
    else:
        labels, label_scores = knn_labels, knn_scores
    unpenalized = recognition.recognition_predictions(list(test_ids), labels, label_scores)
    if penalty_cosine is not None:
        label_scores = non_landmark_penalty.penalize_non_landmarks(
            label_scores,
            penalty_cosine,
            power=ec.recognition_power,
            weight=ec.non_landmark_weight,
        )
    predictions = recognition.recognition_predictions(list(test_ids), labels, label_scores)
    return predictions, unpenalized, top1
