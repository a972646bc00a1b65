"""`python -m landmark_jax.train`'s main, then `evaluate`, in the same processes.

    python tests/helpers/train_then_evaluate.py [train.py's flags]

The 2-process test (test_evaluate.test_two_processes_train_then_evaluate_as_one)
starts its JAX processes once for both programs' work: each start costs every
process its imports, the distributed start-up and its compiles. The training
is the train program's own main (flags, process setup, the trainer); the
evaluation is what evaluate.py's main runs after it (`evaluation.evaluate` of
the same config and workdir, process 0 printing the metrics).
"""

from absl import app

from landmark_jax import train


def main(argv):
    train.main(argv)
    import jax

    from landmark_jax.retrieval import evaluation

    metrics = evaluation.evaluate(train.FLAGS.config, train.FLAGS.workdir)
    if jax.process_index() == 0:
        print(evaluation.format_metrics(metrics))


if __name__ == "__main__":
    app.run(main)
