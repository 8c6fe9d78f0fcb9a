"""Atomic outputs: a failed write leaves the previous file as it was and no temporary behind; JSON has no
NaN/inf; a table is written as parquet and csv holding the same values."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from critlib.io import atomic_path, write_json, write_table


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("first")
    assert target.read_text() == "first" and oct(target.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "first" and [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    write_json(tmp_path / "a.json", {"x": math.nan, 1: [math.inf, 2.5, {"y": -math.inf}]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "1": [None, 2.5, {"y": None}]}


def test_write_table_parquet_and_csv_hold_the_same_values(tmp_path):
    df = pd.DataFrame({"name": ["a", "b", "c"], "score": np.random.default_rng(0).random(3) / 7, "k": [1, 2, 3]})
    write_table(tmp_path / "t", df)
    pq, csv = pd.read_parquet(tmp_path / "t.parquet"), pd.read_csv(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(pq, df)
    assert list(csv.columns) == list(df.columns) and list(csv["name"]) == list(df["name"])
    np.testing.assert_allclose(csv["score"], df["score"], rtol=1e-8)  # csv keeps 9 significant digits
