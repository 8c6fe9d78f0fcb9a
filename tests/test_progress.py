"""`critlib run`'s progress: the channel from a kernel's loops to the terminal (written only under `critlib
run`, throttled on both ends), and the phases' time estimate."""

import io
import math
import os
import time

import pytest

from critlib import progress
from critlib.progress import ENV, Bar, Estimate, Follower, Throttle, previous_times, read, report, track


@pytest.fixture
def channel(tmp_path, monkeypatch):
    path = tmp_path / "progress"
    monkeypatch.setenv(ENV, str(path))
    monkeypatch.setattr(progress, "_last_write", 0.0)
    return path


def test_nothing_is_written_outside_critlib_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    report("scoring", 1, 2)
    for _ in track(range(3), "x"):
        pass
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr() == ("", "")


def test_loops_report_through_the_channel(channel, capsys):
    for _ in Bar(range(4), desc="scoring", disable=True):
        pass
    assert read(channel) == "scoring 4/4"
    bar = Bar(desc="bit flips", disable=True)  # no total: a count
    bar.update(3)
    time.sleep(progress.WRITE_EVERY)
    bar.update(1)
    assert read(channel) == "bit flips 4"
    for _ in Bar(range(50), desc="shown", file=io.StringIO(), mininterval=0, miniters=1):  # tqdm calls update
        pass
    assert read(channel) == "shown 50/50"
    for _ in track(["a", "b"], "flips to break"):
        pass
    assert read(channel) == "flips to break 2/2"
    assert capsys.readouterr() == ("", ""), "a disabled bar prints nothing, to a notebook or a terminal"
    assert [p.name for p in channel.parent.iterdir()] == ["progress"], "a temporary file left behind"


def test_the_writer_is_throttled_but_keeps_the_last_count(channel):
    report("perturbation", 1, 10)
    report("perturbation", 2, 10)  # within WRITE_EVERY of the first: skipped
    assert read(channel) == "perturbation 1/10"
    report("perturbation", 10, 10)  # the last count always goes through
    assert read(channel) == "perturbation 10/10"


def test_throttle():
    t = Throttle(30.0, start=100.0)
    assert [t.due(now) for now in (110.0, 129.9, 130.0, 140.0, 160.0, 161.0)] == \
        [False, False, True, False, True, False]


def test_follower_shows_the_kernels_line_at_most_every_period(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    out = io.StringIO()  # not a terminal: whole lines, throttled
    with Follower("critlib: phase 3/6: Perturbation", out, every=0.3, poll=0.02) as f:
        assert os.environ[ENV] == f.path
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 1.0:
            i += 1
            with open(f.path, "w") as fh:  # what report() leaves there
                fh.write(f"perturbation {i}/1000")
            time.sleep(0.01)
    assert ENV not in os.environ and not os.path.exists(f.path)
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 4, lines  # 1 s at most one line per 0.3 s, the first after 0.3 s
    for line in lines:
        assert line.startswith("critlib: phase 3/6: Perturbation: perturbation ") and line.endswith(" s)")


def test_estimate_from_the_last_run_or_scaled_defaults():
    keys = ["01_sensitivity", "03_perturbation"]
    same = Estimate(keys, {"01_sensitivity": 30.0, "03_perturbation": 200.0}, 2048)
    assert same.line() == "~4 min left (estimate from the last run's phase times)"
    same.finished("01_sensitivity", 25.0)
    assert same.line() == "~4 min left (estimate from the last run's phase times)"
    same.finished("03_perturbation", 190.0)
    assert same.line() == ""
    rough = Estimate(keys, {}, 2048 // 4)  # a quarter of the default data: a quarter of the default times
    d = progress.DEFAULT_SECONDS
    assert rough.remaining() == pytest.approx((d["01_sensitivity"] + d["03_perturbation"]) / 4)
    assert rough.line().endswith("(rough estimate: default phase times scaled by the data size)")
    rough.finished("01_sensitivity", 2.0 * d["01_sensitivity"])  # twice the default's time
    assert rough.remaining() == pytest.approx(2 * d["03_perturbation"])
    assert rough.line() == (f"~{math.ceil(2 * d['03_perturbation'] / 60)} min left (rough estimate: default phase "
                            "times scaled by this run's pace so far)")


def test_previous_times_only_for_the_same_parameters():
    record = {"phases": {"01_sensitivity": {"seconds": 12.5},
                         "02_cross_metric": {"seconds": 9.0, "from_earlier_run": True}}}
    assert previous_times(record, True) == {"01_sensitivity": 12.5}
    assert previous_times(record, False) == {} and previous_times(None, True) == {}
