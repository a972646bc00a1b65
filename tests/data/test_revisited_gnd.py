"""The Revisited Oxford/Paris ground-truth checks (revisited_gnd.read_revisited_gnd and
parse_revisited_gnd)."""

import datetime
import pickle

import pytest

from landmark_jax.data import data_format, revisited_gnd


def _gnd(**overrides):
    gnd = {
        "imlist": ["db0", "db1", "db2", "db3"],
        "qimlist": ["qa", "qb"],
        "gnd": [
            {"bbx": [1, 2.5, 30, 40], "easy": [0, 2], "hard": [1], "junk": []},
            {"bbx": [0.0, 0.0, 5.0, 5.0], "easy": [], "hard": [3], "junk": [0]},
        ],
    }
    gnd.update(overrides)
    return gnd


def _pickle(tmp_path, data, name="gnd_tiny.pkl"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(data))
    return str(path)


def test_read_revisited_gnd(tmp_path):
    data = revisited_gnd.read_revisited_gnd(_pickle(tmp_path, _gnd()))
    assert data["imlist"] == ["db0", "db1", "db2", "db3"] and data["qimlist"] == ["qa", "qb"]
    assert data["gnd"][0] == {
        "bbx": [1.0, 2.5, 30.0, 40.0],
        "easy": [0, 2],
        "hard": [1],
        "junk": [],
    }
    assert data["gnd"][1]["junk"] == [0]


def _bad_query(**fields):
    query = {"bbx": [0, 0, 1, 1], "easy": [0], "hard": [], "junk": []}
    query.update(fields)
    return _gnd(gnd=[query, _gnd()["gnd"][1]])


@pytest.mark.parametrize(
    "data, match",
    [
        (_bad_query(easy=[0, 4]), r"gnd\[0\] \(query 'qa'\): 'easy' holds \[4\]"),
        (_bad_query(junk=[-1]), r"'junk' holds \[-1\]"),
        (_bad_query(hard=[1.0]), r"'hard' holds \[1.0\]"),
        (_bad_query(bbx=[0, 0, 1]), "bbx must be 4 finite numbers"),
        ({"imlist": [], "gnd": []}, r"missing key\(s\) \['qimlist'\]"),
        (_gnd(qimlist=["qa"]), "2 gnd entries for 1 queries"),
        ([1, 2], "expected a dict"),
        (_gnd(imlist="db0"), "imlist: expected a list, got str"),
        (_gnd(qimlist=["qa", 7]), r"qimlist holds \[7\], not image names"),
        (_bad_query(bbx=[0, 0, True, 1]), "bbx must be 4 finite numbers"),
        (_bad_query(junk=3), r"gnd\[0\] \(query 'qa'\): 'junk': expected a list, got int"),
    ],
)
def test_read_revisited_gnd_errors_name_the_file(tmp_path, data, match):
    with pytest.raises(data_format.DataFormatError, match="gnd_tiny.pkl: .*" + match):
        revisited_gnd.read_revisited_gnd(_pickle(tmp_path, data))


def test_read_revisited_gnd_refuses_pickled_objects(tmp_path):
    # Anything beyond plain containers needs a global, which could run code.
    path = _pickle(tmp_path, _gnd(imlist=[datetime.date(2020, 1, 1)]))
    with pytest.raises(data_format.DataFormatError, match="refusing to load global datetime.date"):
        revisited_gnd.read_revisited_gnd(path)
    path = tmp_path / "garbage.pkl"
    path.write_bytes(b"not a pickle")
    with pytest.raises(data_format.DataFormatError, match="garbage.pkl: not a readable gnd pickle"):
        revisited_gnd.read_revisited_gnd(str(path))


def test_parse_revisited_gnd_names_its_source():
    # A build's metadata.json carries the parsed form: parsing it again is the identity.
    parsed = revisited_gnd.parse_revisited_gnd(_gnd(extra="kept out"), "meta.json: gnd")
    assert set(parsed) == {"imlist", "qimlist", "gnd"}
    assert revisited_gnd.parse_revisited_gnd(parsed, "x") == parsed
    with pytest.raises(data_format.DataFormatError, match=r"^meta.json: gnd: 2 gnd entries"):
        revisited_gnd.parse_revisited_gnd(_gnd(qimlist=["qa"]), "meta.json: gnd")
