"""The Revisited Oxford/Paris ground truth (gnd_roxford5k.pkl, gnd_rparis6k.pkl).

`read_revisited_gnd` reads a published pickle without running any code from
it (only plain containers and scalars are unpickled), and
`parse_revisited_gnd` checks its structure, naming what is wrong.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Mapping
from typing import Any

from landmark_jax.data.data_format import DataFormatError
from landmark_jax.runtime import file_io


class _GndUnpickler(pickle.Unpickler):
    # The published gnd pickles hold only dicts, lists, str, int and float;
    # refusing every global keeps a tampered file from running code.
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_revisited_gnd(path: str) -> dict[str, Any]:
    """Reads a Revisited Oxford/Paris ground truth pickle (gnd_roxford5k.pkl, gnd_rparis6k.pkl).

    Args:
      path: the pickle: a dict with 'imlist' (database image names),
        'qimlist' (query image names) and 'gnd' (per query: 'bbx' [x1, y1,
        x2, y2] and 'easy', 'hard', 'junk' lists of 0-based imlist indices).

    Returns:
      The ground truth as parse_revisited_gnd returns it.

    Raises:
      DataFormatError: the file is missing or not such a pickle, or its
        content fails parse_revisited_gnd's checks (the message names the file).
    """
    if not file_io.exists(path):
        raise DataFormatError(f"{path}: file not found")
    try:
        data = _GndUnpickler(io.BytesIO(file_io.read_bytes(path))).load()
    except Exception as e:  # pickle raises many kinds on a bad file
        raise DataFormatError(f"{path}: not a readable gnd pickle: {e}") from e
    return parse_revisited_gnd(data, path)


def parse_revisited_gnd(data: Any, where: str) -> dict[str, Any]:
    """Checks a Revisited ground truth (the gnd pickle's content, or a build's copy).

    Args:
      data: {'imlist': [str], 'qimlist': [str], 'gnd': [per query {'bbx',
        'easy', 'hard', 'junk'}]}, as in the published pickles; other keys
        are dropped.
      where: names the source in errors (the pickle, a build's metadata.json).

    Returns:
      {'imlist': [str], 'qimlist': [str], 'gnd': [{'bbx': [4 floats],
      'easy'|'hard'|'junk': [int]}]}, ready for metrics.revisited_map.

    Raises:
      DataFormatError: not a dict, a key is missing, the lengths disagree, an
        index is outside imlist, or a bbx is not 4 finite numbers.
    """
    if not isinstance(data, Mapping):
        raise DataFormatError(f"{where}: expected a dict, got {type(data).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in data]
    if missing:
        raise DataFormatError(f"{where}: missing key(s) {missing}; has {sorted(data)}")
    imlist, qimlist, gnd = (
        _as_list(data[k], f"{where}: {k}") for k in ("imlist", "qimlist", "gnd")
    )
    for key, names in (("imlist", imlist), ("qimlist", qimlist)):
        bad_names = [n for n in names if not isinstance(n, str)]
        if bad_names:
            raise DataFormatError(f"{where}: {key} holds {bad_names[:3]}, not image names")
    if len(gnd) != len(qimlist):
        raise DataFormatError(
            f"{where}: {len(gnd)} gnd entries for {len(qimlist)} queries in qimlist"
        )
    num_db = len(imlist)
    out = []
    for q, entry in enumerate(gnd):
        name = f"{where}: gnd[{q}] (query {qimlist[q]!r})"
        if not isinstance(entry, Mapping):
            raise DataFormatError(f"{name}: expected a dict, got {type(entry).__name__}")
        lacking = [k for k in ("bbx", "easy", "hard", "junk") if k not in entry]
        if lacking:
            raise DataFormatError(f"{name}: missing key(s) {lacking}")
        bbx = _as_list(entry["bbx"], f"{name}: bbx")
        if len(bbx) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in bbx
        ):
            raise DataFormatError(f"{name}: bbx must be 4 finite numbers, got {bbx}")
        parsed: dict[str, Any] = {"bbx": [float(v) for v in bbx]}
        for key in ("easy", "hard", "junk"):
            indices = _as_list(entry[key], f"{name}: {key!r}")
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)]
            bad += [i for i in indices if i not in bad and not 0 <= i < num_db]
            if bad:
                raise DataFormatError(
                    f"{name}: '{key}' holds {bad[:5]}, not indices into imlist "
                    f"(0..{num_db - 1}, 0-based)"
                )
            parsed[key] = indices
        out.append(parsed)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": out}


def _as_list(value: Any, what: str) -> list:
    # A str or dict would iterate without complaint into nonsense entries.
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise DataFormatError(f"{what}: expected a list, got {type(value).__name__}")
    return list(value)
