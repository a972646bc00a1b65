"""The package's folders and the imports allowed between them, read with `ast`.

Every `import`/`from ... import` of the package counts, at module level or
inside a function. A lower folder never imports a higher one:

    runtime/    files, leases, devices, processes, start-up: nothing above it
    models/     runtime/
    data/       runtime/
    training/   models/, data/, runtime/ (never retrieval/ or workdir/)
    workdir/    models/, data/, runtime/ (never training/ or the trainer)
    config_lib  training/, models/, data/, runtime/ (never retrieval/)
    retrieval/  all of the above
    serving/    retrieval/ and all below it (export and search)
    trainer     of retrieval/ only validation and extract
    data_pipelines/  landmark_jax's data/ and runtime/ only

and no module imports itself through others (no import circle).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

BELOW = {
    "runtime": {"runtime"},
    "models": {"models", "runtime"},
    "data": {"data", "runtime"},
    "training": {"training", "models", "data", "runtime"},
    "workdir": {"workdir", "models", "data", "runtime"},
    "config_lib": {"config_lib", "config_files", "training", "models", "data", "runtime"},
    "config_files": {"config_files", "runtime"},
    "retrieval": {
        "retrieval",
        "config_lib",
        "config_files",
        "training",
        "workdir",
        "models",
        "data",
        "runtime",
    },
}
BELOW["serving"] = BELOW["retrieval"] | {"serving"}
TRAINER_RETRIEVAL = {"landmark_jax.retrieval.validation", "landmark_jax.retrieval.extract"}
PIPELINE_ALLOWED = {"data", "runtime"}


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path, root: pathlib.Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import of `package` in a file, modules resolved:
    `from landmark_jax.data import input_pipeline` is landmark_jax.data.input_pipeline."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == package]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != package:
                continue
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                is_module = (root / (name.replace(".", "/") + ".py")).exists() or (
                    root / name.replace(".", "/") / "__init__.py"
                ).exists()
                found.append((node.lineno, name if is_module else node.module))
    return found


def import_graph(root: pathlib.Path, folders: tuple[str, ...]) -> dict[str, list[tuple[int, str]]]:
    """{module: [(line, imported module of landmark_jax)]} over the given folders."""
    graph = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            graph[module_name(path, root)] = imports_of(path, root, "landmark_jax")
    return graph


def _layer(module: str) -> str | None:
    """The folder (or top-level module) of a landmark_jax module the rules name."""
    parts = module.split(".")
    if parts[0] != "landmark_jax" or len(parts) < 2:
        return None
    return parts[1]


def violations(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Each import that breaks a rule, as 'importer:line imports module: rule'."""
    found = []
    for importer, imports in graph.items():
        layer = _layer(importer)
        for line, module in imports:
            target = _layer(module)
            where = f"{importer}:{line} imports {module}"
            if importer.startswith("data_pipelines"):
                if target not in PIPELINE_ALLOWED:
                    found.append(f"{where}: data_pipelines/ may import only data/ and runtime/")
            elif importer == "landmark_jax.trainer":
                if target == "retrieval" and module not in TRAINER_RETRIEVAL:
                    found.append(
                        f"{where}: the trainer imports of retrieval/ only validation and extract"
                    )
            elif layer in BELOW and target is not None and target not in BELOW[layer]:
                found.append(f"{where}: {layer} may import only {sorted(BELOW[layer])}")
    return found


def circles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """The import circles among the graph's modules (each once, as a path)."""
    edges = {
        m: sorted({t for _, t in imports if t in graph and t != m}) for m, imports in graph.items()
    }
    found, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in edges[module]:
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def test_no_import_breaks_a_folder_rule():
    graph = import_graph(REPO, ("landmark_jax", "data_pipelines"))
    assert "landmark_jax.runtime.file_io" in graph and "landmark_jax.trainer" in graph
    assert violations(graph) == []


def test_no_import_circle():
    graph = import_graph(REPO, ("landmark_jax", "data_pipelines"))
    assert circles(graph) == []


@pytest.fixture
def layered(tmp_path):
    """A package laid out like landmark_jax, with one import to add per test."""
    for name in (
        "landmark_jax/runtime/file_io.py",
        "landmark_jax/data/input_pipeline.py",
        "landmark_jax/workdir/checkpointing.py",
        "landmark_jax/retrieval/evaluation.py",
        "landmark_jax/retrieval/validation.py",
        "landmark_jax/trainer.py",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("import os\n")
    return tmp_path


@pytest.mark.parametrize(
    "importer, source, rule",
    [
        (
            "landmark_jax/data/input_pipeline.py",
            "from landmark_jax.workdir import checkpointing\n",
            "landmark_jax.data.input_pipeline:1 imports landmark_jax.workdir.checkpointing: "
            "data may import only ['data', 'runtime']",
        ),
        (
            "landmark_jax/runtime/file_io.py",
            "def f():\n    from landmark_jax.data import input_pipeline\n",
            "landmark_jax.runtime.file_io:2 imports landmark_jax.data.input_pipeline",
        ),
        (
            "landmark_jax/trainer.py",
            "from landmark_jax.retrieval import evaluation, validation\n",
            "landmark_jax.trainer:1 imports landmark_jax.retrieval.evaluation: the trainer",
        ),
    ],
)
def test_the_rules_name_a_breaking_import(layered, importer, source, rule):
    (layered / importer).write_text(source)
    (found,) = violations(import_graph(layered, ("landmark_jax",)))
    assert found.startswith(rule)


def test_a_circle_is_found(layered):
    (layered / "landmark_jax/retrieval/evaluation.py").write_text(
        "from landmark_jax.retrieval import validation\n"
    )
    (layered / "landmark_jax/retrieval/validation.py").write_text(
        "def f():\n    from landmark_jax.retrieval import evaluation\n"
    )
    assert circles(import_graph(layered, ("landmark_jax",))) == [
        [
            "landmark_jax.retrieval.evaluation",
            "landmark_jax.retrieval.validation",
            "landmark_jax.retrieval.evaluation",
        ]
    ]
