"""experiments/colab_tpu.ipynb: its code cells run on CPU in smoke mode, the
Colab-only ones (tagged `colab`) at least parse."""

import json
import os
import sys

import numpy as np
import pytest
from configs_for_tests import REPO
from IPython.core.inputtransformer2 import TransformerManager
from PIL import Image

NOTEBOOK = os.path.join(REPO, "experiments", "colab_tpu.ipynb")


def _code_cells():
    with open(NOTEBOOK) as f:
        notebook = json.load(f)
    assert notebook["nbformat"] == 4
    return [
        ("".join(cell["source"]), set(cell["metadata"].get("tags", ())))
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
    ]


def test_colab_cells_parse_and_the_rest_is_plain_python():
    cells = _code_cells()
    colab = [source for source, tags in cells if "colab" in tags]
    # Install, Cloud Storage login and TensorBoard: Colab alone has them.
    assert len(colab) == 3 and any("auth.authenticate_user()" in s for s in colab)
    for source, tags in cells:
        if "colab" in tags:
            compile(TransformerManager().transform_cell(source), "colab cell", "exec")
        else:
            # No shell escapes or magics outside the Colab-only cells: the
            # test below executes these as they are.
            compile(source, "cell", "exec")


@pytest.mark.e2e
def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("LANDMARK_JAX_NOTEBOOK", "smoke")
    monkeypatch.setenv("LANDMARK_JAX_REPO", REPO)
    monkeypatch.setenv("LANDMARK_JAX_NOTEBOOK_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the notebook changes to the repository itself
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = {"__name__": "__main__"}
    for source, tags in _code_cells():
        if "colab" not in tags:
            exec(compile(source, "notebook cell", "exec"), namespace)

    assert os.getcwd() == REPO
    # It built the demo data, trained the smoke config to its end, drew the
    # curves and evaluated with the baselines beside the learned figure.
    assert os.path.exists(
        tmp_path / "tfds" / "landmark_demo" / "default" / "1.0.0" / "features.json"
    )
    assert namespace["config"].total_steps == 6 and np.isfinite(namespace["last"]["loss"])
    with open(tmp_path / "workdir" / "metrics.jsonl") as f:
        assert json.loads(f.readlines()[-1])["step"] == 6
    metrics = namespace["metrics"]
    assert 0.0 <= metrics["map@100"] <= 1.0 and set(metrics["baselines"]) == {
        "untrained",
        "raw_pixels",
        "chance",
    }
    assert "retrieval mAP@100 on" in namespace["evaluation"].format_metrics(metrics)
    curves = namespace["training_summary"].curves_png(str(tmp_path / "workdir"))
    assert curves.startswith(b"\x89PNG")
    with Image.open(tmp_path / "workdir" / "eval" / "gallery.png") as gallery:
        assert gallery.width > 0
    # Exported, then used to index the demo's index photos and query its test ones.
    assert os.path.exists(tmp_path / "workdir_export" / "saved_model.pb")
    assert namespace["info"]["descriptor_dim"] == namespace["index"].info["descriptor_dim"]

    def listed(split):
        with open(tmp_path / "raw" / f"{split}.csv") as f:
            return sorted(line.strip() for line in f.readlines()[1:])

    assert namespace["index"].info["count"] == len(listed("index"))
    found = namespace["found"]
    assert sorted(found.ids) == listed("test")
    with open(tmp_path / "workdir_search" / "neighbours.csv") as f:
        assert f.readline().strip() == "query,rank,id,path,score,distance"
        assert len(f.readlines()) == 5 * len(found.ids)
    with Image.open(tmp_path / "workdir_search" / "gallery.png") as gallery:
        assert gallery.width > 0
