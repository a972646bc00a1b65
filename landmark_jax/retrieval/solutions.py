"""Ground truth and submission files: GLDv2 solution/prediction CSVs.

GLDv2 solutions (`retrieval_solution_v2.1.csv`: `id,images,Usage`;
`recognition_solution_v2.1.csv`: `id,landmarks,Usage`) are split by Usage into
Public and Private; Ignored rows are dropped but their ids are kept, so that
predictions for them are accepted and skipped, as DELF's `dataset_file_io`
does, while predictions for unknown ids are errors. Submissions are the
Kaggle CSVs `id,images` (index ids, best first, space separated) and
`id,landmarks` ("<landmark> <score>"); an empty field means no prediction.

Where DELF is lenient (a test id repeated in a solution silently overwrites
the earlier row; columns are taken by position whatever the header says; a
short row fails with an IndexError), these readers raise a
`SolutionFormatError` naming the file and line instead. Valid files read the
same as with DELF.
Paths may be local or URLs (gs://), read and written through `file_io`. Scoring predictions
against a solution per usage lives in `landmark_jax.retrieval.usage_metrics`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypedDict

from landmark_jax.runtime import file_io

PUBLIC = "Public"
PRIVATE = "Private"
IGNORED = "Ignored"
ALL = "All"
USAGES = (PUBLIC, PRIVATE)


class SolutionFormatError(ValueError):
    """A solution, submission or ground-truth file does not have the expected format."""


class RetrievalSolution(TypedDict):
    """Query id -> relevant index ids per scored usage, plus the ignored ids."""

    Public: dict[str, list[str]]
    Private: dict[str, list[str]]
    Ignored: list[str]


class RecognitionSolution(TypedDict):
    """Test id -> landmark ids (empty: not a landmark) per usage, plus the ignored ids."""

    Public: dict[str, list[int]]
    Private: dict[str, list[int]]
    Ignored: list[str]


@contextlib.contextmanager
def _open(path: str, mode: str) -> Iterator[io.TextIOBase]:
    if "r" in mode:
        if not file_io.isfile(path):
            raise SolutionFormatError(f"{path}: file not found")
        # newline='': csv handles line ends; read_text drops the byte-order
        # mark a spreadsheet may have saved, which would stick to a column name.
        yield io.StringIO(file_io.read_text(path), newline="")
        return
    buffer = io.StringIO(newline="")
    yield buffer
    file_io.write_text(path, buffer.getvalue())


def _csv_rows(path: str, columns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """Yields (line number, [value of each column]) of a CSV, checking its header.

    Blank lines are skipped, as DELF does; a row whose field count differs
    from the header's is an error.
    """
    with _open(path, "r") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise SolutionFormatError(f"{path}:1: empty file, expected header {','.join(columns)}")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise SolutionFormatError(
                f"{path}:1: missing column(s) {missing}; the header is {header}, "
                f"expected {','.join(columns)}"
            )
        where = [header.index(c) for c in columns]
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise SolutionFormatError(
                    f"{path}:{reader.line_num}: {len(row)} fields, the header has "
                    f"{len(header)}: {row}"
                )
            yield reader.line_num, [row[i] for i in where]


def _parse_int(path: str, line: int, token: str, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise SolutionFormatError(f"{path}:{line}: {what} {token!r} is not an integer") from None


def _read_solution(path: str, column: str, parse) -> dict[str, Any]:
    solution: dict[str, Any] = {PUBLIC: {}, PRIVATE: {}, IGNORED: []}
    first_line: dict[str, int] = {}
    for line, (test_id, value, usage) in _csv_rows(path, ("id", column, "Usage")):
        test_id = test_id.strip()
        if test_id in first_line:
            raise SolutionFormatError(
                f"{path}:{line}: test id {test_id!r} repeats line {first_line[test_id]}"
            )
        first_line[test_id] = line
        usage = usage.strip()
        if usage == IGNORED:
            # Not parsed, as in DELF: ignored rows carry 'None' or anything.
            solution[IGNORED].append(test_id)
        elif usage in USAGES:
            solution[usage][test_id] = parse(line, value.strip())
        else:
            raise SolutionFormatError(
                f"{path}:{line}: test id {test_id!r} has Usage {usage!r}, expected one of "
                f"{[PUBLIC, PRIVATE, IGNORED]}"
            )
    return solution


def read_retrieval_solution(path: str) -> RetrievalSolution:
    """Reads a GLDv2 retrieval solution CSV (`id,images,Usage`).

    A Public/Private row whose `images` is empty or 'None' gets an empty list:
    such a query cannot be answered, scores 0 and still counts in the mean
    (DELF reads it as one id that never matches, with the same result).

    Args:
      path: the CSV file.

    Returns:
      {'Public': {query id: [index ids]}, 'Private': {...}, 'Ignored': [ids]}.

    Raises:
      SolutionFormatError: the file is missing, lacks a column, has a row with
        the wrong field count, an unknown Usage, or a repeated test id.
    """

    def parse(line: int, value: str) -> list[str]:
        return [] if value == "None" else value.split()

    return _read_solution(path, "images", parse)  # type: ignore[return-value]


def read_recognition_solution(path: str) -> RecognitionSolution:
    """Reads a GLDv2 recognition solution CSV (`id,landmarks,Usage`).

    Args:
      path: the CSV file.

    Returns:
      {'Public': {test id: [landmark ids]}, 'Private': {...}, 'Ignored': [ids]};
      an empty `landmarks` field (a non-landmark image) gives [].

    Raises:
      SolutionFormatError: as read_retrieval_solution, or a landmark id is not
        an integer.
    """

    def parse(line: int, value: str) -> list[int]:
        return [_parse_int(path, line, t, "landmark id") for t in value.split()]

    return _read_solution(path, "landmarks", parse)  # type: ignore[return-value]


def merged_usages(solution: Mapping[str, Any]) -> dict[str, Any]:
    """A solution's Public and Private rows in one mapping (Ignored ones left out).

    Args:
      solution: a read_retrieval_solution / read_recognition_solution result.

    Returns:
      {test id: ground truth} of every scored test image.
    """
    return {**solution[PUBLIC], **solution[PRIVATE]}


def ids_not_in(solution: Mapping[str, Any], present: Iterable[str], path: str) -> int:
    """Warns when scored test ids of a solution are not among the test images.

    A missing query counts as a miss (its average precision is 0), which
    lowers the score without any error; a solution for another test set, or a
    test split built from part of the CSV, shows up here first.

    Args:
      solution: a read_*_solution result.
      present: the ids of the test split that was embedded.
      path: the solution file, for the message.

    Returns:
      How many scored ids are missing (0 when all are present).
    """
    present = set(present)
    missing = sorted(i for i in merged_usages(solution) if i not in present)
    if missing:
        logging.warning(
            "%s: %d of its %d scored test ids are not in the test split (e.g. %s); "
            "they count as misses",
            path,
            len(missing),
            len(merged_usages(solution)),
            ", ".join(missing[:5]),
        )
    return len(missing)


def index_ids_not_in(solution: Mapping[str, Any], present: Iterable[str], path: str) -> int:
    """Warns when a retrieval solution's scored rows list index ids the index lacks.

    Such an id can never be retrieved, yet it still counts among its query's
    relevant images, so that query's average precision cannot reach 1: a
    solution for another index, or an index split built from part of
    index.csv, lowers mAP@100 without any error (as ids_not_in, for queries).

    Args:
      solution: a read_retrieval_solution result.
      present: the ids of the index split that was embedded.
      path: the solution file, for the message.

    Returns:
      How many distinct listed index ids are missing (0 when all are present).
    """
    present = set(present)
    listed = {i for images in merged_usages(solution).values() for i in images}
    missing = sorted(listed - present)
    if missing:
        logging.warning(
            "%s: %d of the %d index ids its scored queries list are not in the index split "
            "(e.g. %s); they can never be retrieved",
            path,
            len(missing),
            len(listed),
            ", ".join(missing[:5]),
        )
    return len(missing)


def _prediction_tokens(value: str) -> list[str]:
    # DELF splits on single spaces and drops one trailing empty token, so a
    # trailing space is fine but a double space yields an empty id that still
    # takes a rank. Kept as is: it decides what the submission scores.
    tokens = value.split(" ")
    if not tokens[-1]:
        tokens = tokens[:-1]
    return tokens


def _read_predictions(path: str, column: str, parse) -> dict[str, Any]:
    predictions: dict[str, Any] = {}
    first_line: dict[str, int] = {}
    for line, (test_id, value) in _csv_rows(path, ("id", column)):
        test_id = test_id.strip()
        if test_id in first_line:
            raise SolutionFormatError(
                f"{path}:{line}: test id {test_id!r} repeats line {first_line[test_id]}"
            )
        first_line[test_id] = line
        if value:
            predictions[test_id] = parse(line, test_id, _prediction_tokens(value))
    return predictions


def read_retrieval_predictions(path: str) -> dict[str, list[str]]:
    """Reads a Kaggle retrieval submission (`id,images`).

    Args:
      path: the CSV file.

    Returns:
      Query id -> index ids, best first, as written (the metric scores the
      first 100). Rows with an empty `images` field are left out.

    Raises:
      SolutionFormatError: the file is missing, lacks a column, has a bad row
        or a repeated id.
    """
    return _read_predictions(path, "images", lambda line, test_id, tokens: tokens)


def read_recognition_predictions(path: str) -> dict[str, tuple[int, float]]:
    """Reads a Kaggle recognition submission (`id,landmarks` with "<landmark> <score>").

    Args:
      path: the CSV file.

    Returns:
      Test id -> (landmark id, score). Rows with an empty field are left out.

    Raises:
      SolutionFormatError: (a ValueError) the field does not hold exactly two
        tokens, the landmark is not an integer or the score not a number, or
        as read_retrieval_predictions.
    """

    def parse(line: int, test_id: str, tokens: list[str]) -> tuple[int, float]:
        if len(tokens) != 2:
            raise SolutionFormatError(
                f"{path}:{line}: prediction for {test_id!r} must be '<landmark> <score>', "
                f"found {len(tokens)} tokens: {tokens}"
            )
        landmark = _parse_int(path, line, tokens[0], "landmark id")
        try:
            score = float(tokens[1])
        except ValueError:
            raise SolutionFormatError(
                f"{path}:{line}: score {tokens[1]!r} is not a number"
            ) from None
        return landmark, score

    return _read_predictions(path, "landmarks", parse)


def _rows_in_order(
    predictions: Mapping[str, Any], all_ids: Iterable[str] | None
) -> list[tuple[str, Any]]:
    if all_ids is None:
        return list(predictions.items())
    ids = list(all_ids)
    unknown = set(predictions) - set(ids)
    if unknown:
        raise ValueError(f"predictions for ids not in all_ids: {sorted(unknown)[:5]}")
    return [(i, predictions.get(i)) for i in ids]


def _check_token(kind: str, value: str) -> str:
    # Ids with separators would not read back as written.
    if not value or any(c in value for c in ' ,"\n\r\t'):
        raise ValueError(f"{kind} {value!r} is empty or holds a space, comma, quote or newline")
    return value


def write_retrieval_submission(
    path: str,
    predictions: Mapping[str, Sequence[str] | None],
    all_ids: Iterable[str] | None = None,
    max_images: int = 100,
) -> None:
    """Writes a Kaggle retrieval submission (`id,images`).

    Args:
      path: the CSV file to write.
      predictions: query id -> index ids, best first; only the first
        `max_images` are written (the metric scores no more). None or an empty
        list writes an empty field.
      all_ids: every test id, in the order to write them; ids without a
        prediction get an empty field. None: the predictions' ids in order.
      max_images: the most ids written per query.

    Raises:
      ValueError: an id is empty or holds a separator, or a prediction's id is
        not in `all_ids`.
    """
    with _open(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("id", "images"))
        for test_id, images in _rows_in_order(predictions, all_ids):
            if isinstance(images, str):
                raise ValueError(f"prediction for {test_id!r} is a string, expected a list of ids")
            field = " ".join(_check_token("index id", i) for i in (images or [])[:max_images])
            writer.writerow((_check_token("test id", test_id), field))


def write_recognition_submission(
    path: str,
    predictions: Mapping[str, tuple[int, float] | None],
    all_ids: Iterable[str] | None = None,
) -> None:
    """Writes a Kaggle recognition submission (`id,landmarks`, "<landmark> <score>").

    Scores are written with repr(), so they read back bit for bit.

    Args:
      path: the CSV file to write.
      predictions: test id -> (landmark id, score); None writes an empty field.
      all_ids: as write_retrieval_submission.

    Raises:
      ValueError: an id holds a separator, a landmark is not an integer, a
        score is not finite, or a prediction's id is not in `all_ids`.
    """
    with _open(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("id", "landmarks"))
        for test_id, prediction in _rows_in_order(predictions, all_ids):
            field = ""
            if prediction is not None:
                landmark, score = prediction
                if isinstance(landmark, bool) or int(landmark) != landmark:
                    raise ValueError(f"landmark {landmark!r} of {test_id!r} is not an integer")
                if not math.isfinite(float(score)):
                    raise ValueError(f"score {score!r} of {test_id!r} is not finite")
                field = f"{int(landmark)} {float(score)!r}"
            writer.writerow((_check_token("test id", test_id), field))
