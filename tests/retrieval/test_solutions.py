"""GLDv2 solution/submission readers and writers, the Revisited gnd reader, metrics per usage."""

import pytest

from landmark_jax.retrieval import solutions, usage_metrics
from landmark_jax.retrieval.solutions import SolutionFormatError


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


_RETRIEVAL_CSV = """id,images,Usage
q1,a b,Public
q2,c,Private
q3,None,Ignored

q4,,Ignored
q5,None,Public
q6,d  e ,Private
"""

_RECOGNITION_CSV = """id,landmarks,Usage
t1,1 2,Public
t2,,Public
t3,None,Ignored
t4,7,Private
t5,,Private
"""


# --------------------------------------------------------------------------
# Solutions.


def test_read_retrieval_solution(tmp_path):
    path = _write(tmp_path, "retrieval_solution.csv", _RETRIEVAL_CSV)
    solution = solutions.read_retrieval_solution(path)
    # 'None' on a scored row: an unanswerable query (scores 0, still counts).
    assert solution["Public"] == {"q1": ["a", "b"], "q5": []}
    assert solution["Private"] == {"q2": ["c"], "q6": ["d", "e"]}
    # Ignored rows are not parsed; the blank line is skipped.
    assert solution["Ignored"] == ["q3", "q4"]


def test_read_retrieval_solution_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _RETRIEVAL_CSV.encode())
    assert solutions.read_retrieval_solution(str(path))["Public"]["q1"] == ["a", "b"]


def test_read_recognition_solution(tmp_path):
    path = _write(tmp_path, "recognition_solution.csv", _RECOGNITION_CSV)
    solution = solutions.read_recognition_solution(path)
    assert solution["Public"] == {"t1": [1, 2], "t2": []}
    assert solution["Private"] == {"t4": [7], "t5": []}
    assert solution["Ignored"] == ["t3"]  # its 'None' is never parsed


@pytest.mark.parametrize(
    "text, match",
    [
        ("id,images\nq1,a\n", r":1: missing column\(s\) \['Usage'\]"),
        ("", ":1: empty file"),
        ("id,images,Usage\nq1,a,Public\nq2,b,Secret\n", ":3: .*'Secret'"),
        ("id,images,Usage\nq1,a,Public\nq2,b,Private\nq1,c,Private\n", ":4: .*'q1' repeats line 2"),
        ("id,images,Usage\nq1,a,Public,extra\n", ":2: 4 fields"),
    ],
)
def test_read_retrieval_solution_errors_name_file_and_line(tmp_path, text, match):
    path = _write(tmp_path, "bad_solution.csv", text)
    with pytest.raises(SolutionFormatError, match="bad_solution.csv" + match):
        solutions.read_retrieval_solution(path)


def test_read_recognition_solution_non_integer_landmark(tmp_path):
    path = _write(tmp_path, "rec.csv", "id,landmarks,Usage\nt1,1,Public\nt2,12 x7,Private\n")
    with pytest.raises(SolutionFormatError, match=r"rec.csv:3: landmark id 'x7'"):
        solutions.read_recognition_solution(path)
    # A 'None' on a scored recognition row is a bad landmark too (DELF: int('None')).
    path = _write(tmp_path, "rec2.csv", "id,landmarks,Usage\nt1,None,Public\n")
    with pytest.raises(SolutionFormatError, match="rec2.csv:2: landmark id 'None'"):
        solutions.read_recognition_solution(path)


def test_ids_the_test_and_index_splits_lack_are_counted_and_warned(tmp_path, caplog):
    path = _write(tmp_path, "retrieval_solution.csv", _RETRIEVAL_CSV)
    solution = solutions.read_retrieval_solution(path)
    # Scored queries q1 q2 q5 q6 list index ids a b c d e; Ignored rows count for neither.
    with caplog.at_level("WARNING"):
        assert solutions.ids_not_in(solution, ["q1", "q2", "q3", "q5", "q6"], path) == 0
        assert solutions.index_ids_not_in(solution, ["a", "b", "c", "d", "e", "z"], path) == 0
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        assert solutions.ids_not_in(solution, ["q1", "q6"], path) == 2
        assert solutions.index_ids_not_in(solution, ["b", "d", "z"], path) == 3
    assert f"{path}: 2 of its 4 scored test ids are not in the test split (e.g. q2, q5)" in (
        caplog.text
    )
    assert (
        f"{path}: 3 of the 5 index ids its scored queries list are not in the index split "
        "(e.g. a, c, e); they can never be retrieved"
    ) in caplog.text


def test_missing_file(tmp_path):
    with pytest.raises(SolutionFormatError, match="nope.csv: file not found"):
        solutions.read_retrieval_solution(str(tmp_path / "nope.csv"))


# --------------------------------------------------------------------------
# Submissions.


def test_read_retrieval_predictions(tmp_path):
    text = "id,images\nq1,a b c \nq2,\n\nq3,x  y\n"
    predictions = solutions.read_retrieval_predictions(_write(tmp_path, "sub.csv", text))
    # Trailing space tolerated; an empty field is no prediction; a double space
    # leaves an empty id that takes a rank, as DELF's reader does.
    assert predictions == {"q1": ["a", "b", "c"], "q3": ["x", "", "y"]}


def test_read_retrieval_predictions_repeated_id(tmp_path):
    path = _write(tmp_path, "sub.csv", "id,images\nq1,a\nq2,b\nq1,c\n")
    with pytest.raises(SolutionFormatError, match="sub.csv:4: .*'q1' repeats line 2"):
        solutions.read_retrieval_predictions(path)


def test_read_recognition_predictions(tmp_path):
    text = "id,landmarks\nt1,5 0.25\nt2,\nt3,7 1e-3 \n"
    predictions = solutions.read_recognition_predictions(_write(tmp_path, "sub.csv", text))
    assert predictions == {"t1": (5, 0.25), "t3": (7, 0.001)}


@pytest.mark.parametrize(
    "field, match",
    [
        ("5", "found 1 tokens"),
        ("5 0.9 3", "found 3 tokens"),
        ("5  0.9", "found 3 tokens"),
        ("x 0.9", "landmark id 'x'"),
        ("5 high", "score 'high'"),
    ],
)
def test_read_recognition_predictions_malformed(tmp_path, field, match):
    path = _write(tmp_path, "sub.csv", f"id,landmarks\nt0,1 0.5\nt1,{field}\n")
    # SolutionFormatError is a ValueError, as DELF raises.
    with pytest.raises(ValueError, match=f"sub.csv:3: .*{match}"):
        solutions.read_recognition_predictions(path)


def test_retrieval_submission_round_trip(tmp_path):
    path = str(tmp_path / "retrieval_submission.csv")
    predictions = {"q2": ["b", "a", "b"], "q1": [f"i{n}" for n in range(150)]}
    solutions.write_retrieval_submission(path, predictions, all_ids=["q1", "q2", "q3"])
    lines = open(path).read().splitlines()
    assert lines[0] == "id,images" and lines[2] == "q2,b a b" and lines[3] == "q3,"
    # Only the first 100 ids are written (the metric scores no more).
    assert solutions.read_retrieval_predictions(path) == {
        "q1": predictions["q1"][:100],
        "q2": ["b", "a", "b"],
    }
    solutions.write_retrieval_submission(path, {"q": ["a"]})
    assert solutions.read_retrieval_predictions(path) == {"q": ["a"]}


def test_recognition_submission_round_trip(tmp_path):
    path = str(tmp_path / "recognition_submission.csv")
    predictions = {"t1": (5, 0.1 + 0.2), "t2": None, "t3": (12, 1e-7)}
    solutions.write_recognition_submission(path, predictions)
    assert open(path).read().splitlines()[2] == "t2,"
    # Scores come back bit for bit.
    assert solutions.read_recognition_predictions(path) == {"t1": (5, 0.1 + 0.2), "t3": (12, 1e-7)}


@pytest.mark.parametrize(
    "write, predictions, match",
    [
        (solutions.write_retrieval_submission, {"q": ["a b"]}, "space"),
        (solutions.write_retrieval_submission, {"q,1": ["a"]}, "comma"),
        (solutions.write_retrieval_submission, {"q": "a b"}, "string"),
        (solutions.write_recognition_submission, {"t": (5, float("nan"))}, "finite"),
        (solutions.write_recognition_submission, {"t": ("5", 0.5)}, "integer"),
    ],
)
def test_writers_reject_what_would_not_read_back(tmp_path, write, predictions, match):
    with pytest.raises(ValueError, match=match):
        write(str(tmp_path / "x.csv"), predictions)


def test_writer_rejects_ids_outside_all_ids(tmp_path):
    with pytest.raises(ValueError, match="zzz"):
        solutions.write_retrieval_submission(str(tmp_path / "x.csv"), {"zzz": ["a"]}, ["q"])


# --------------------------------------------------------------------------
# Metrics per usage.


def test_retrieval_metrics_by_usage(tmp_path):
    solution = solutions.read_retrieval_solution(_write(tmp_path, "s.csv", _RETRIEVAL_CSV))
    # q3 is ignored: accepted and skipped. q1: a@1, b@3 -> 5/6. q5 ('None')
    # and q2 (unpredicted) score 0. q6: e@1 -> (1/1)/2.
    predictions = {"q1": ["a", "x", "b"], "q3": ["z"], "q5": ["a"], "q6": ["e"]}
    results = usage_metrics.retrieval_metrics_by_usage(predictions, solution)
    assert results["Public"]["map@100"] == pytest.approx((5 / 6 + 0) / 2)
    assert results["Private"]["map@100"] == pytest.approx((0 + 1 / 2) / 2)
    assert results["All"]["map@100"] == pytest.approx((5 / 6 + 1 / 2) / 4)
    assert results["Public"]["mp@1"] == pytest.approx(1 / 2)
    assert results["Public"]["mean_position"] == pytest.approx((1 + 101) / 2)
    assert set(results["All"]) == {
        "map@100", "mp@1", "mp@5", "mp@10", "mp@50", "mp@100", "mean_position", "median_position"
    }  # fmt: skip
    with pytest.raises(ValueError, match="zzz"):
        usage_metrics.retrieval_metrics_by_usage({"zzz": ["a"]}, solution)


def test_recognition_metrics_by_usage(tmp_path):
    solution = solutions.read_recognition_solution(_write(tmp_path, "s.csv", _RECOGNITION_CSV))
    # t3 is ignored. Public: t2 (no landmark, 0.9) ranks before t1 (right,
    # 0.8), so 1/2 over 1 GT image. Private: t4 right alone: 1. All: t2, then
    # t1 (1 correct at rank 2: 1/2), then t4 (2 at rank 3: 2/3), over 2.
    predictions = {"t1": (2, 0.8), "t2": (9, 0.9), "t3": (1, 1.0), "t4": (7, 0.5)}
    results = usage_metrics.recognition_metrics_by_usage(predictions, solution)
    assert results["Public"] == pytest.approx({"gap": 1 / 2, "top1_accuracy": 1.0})
    assert results["Private"] == pytest.approx({"gap": 1.0, "top1_accuracy": 1.0})
    assert results["All"]["gap"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    ignoring = usage_metrics.recognition_metrics_by_usage(
        predictions, solution, ignore_non_gt_test_images=True
    )
    assert ignoring["Public"]["gap"] == pytest.approx(1.0)


def test_usage_without_queries_is_left_out(tmp_path):
    path = _write(tmp_path, "s.csv", "id,images,Usage\nq1,a,Public\nq2,None,Ignored\n")
    solution = solutions.read_retrieval_solution(path)
    assert set(usage_metrics.retrieval_metrics_by_usage({}, solution)) == {"Public", "All"}


def test_split_predictions():
    solution = {"Public": {"a": [1]}, "Private": {"b": []}, "Ignored": ["c"]}
    split = usage_metrics.split_predictions({"a": (1, 0.5), "b": (2, 0.1), "c": (3, 1.0)}, solution)
    assert split == {"Public": {"a": (1, 0.5)}, "Private": {"b": (2, 0.1)}}
