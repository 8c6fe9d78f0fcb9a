"""The run layer's context and commands: outputs are checked before any computation and replace the previous
run's as one set, held-out windows are limited as asked, and fingerprint/verify check their inputs. Each phase
has its own file (tests/test_run_<phase>.py)."""


import pytest

from critlib import CritlibError
from critlib.cli import main
from critlib.run import commands
from critlib.run.context import check_output_dir, staged
from tests.conftest import RUN_SETS as SETS
from tests.conftest import folder_files as _files
from tests.conftest import run_cli as _cli

def test_a_failure_between_two_writes_keeps_the_previous_set(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _cli("score", "-o", str(out)) == 0
    before = _files(out)
    from critlib.run import sensitivity as phase1
    real = phase1.write_json

    def failing(path, obj):
        if path.name == "sensitivity_stats.json":
            raise KeyboardInterrupt  # after top_weights.* were written into the staging folder
        real(path, obj)

    monkeypatch.setattr(phase1, "write_json", failing)
    assert _cli("score", "-o", str(out), sets=SETS + ["seed=1"]) == 130
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.cache", "out"]  # no staging folder left


@pytest.mark.parametrize("where", ["a_file", "a_file/under", "missing/../a_file"])
def test_output_location_checked_before_any_computation(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(commands, "prepare", lambda *a: pytest.fail("computed before checking the output"))
    for verb in ("score", "applications", "prune"):
        assert _cli(verb, "-o", str(tmp_path / where)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("critlib: error: output folder") and "-o" in err[0], err
    assert (tmp_path / "a_file").read_text() == "x"


def test_run_checks_its_output_before_running_notebooks(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["run", "-p", "params/tiny.yaml", "-o", str(tmp_path / "a_file"), "-q"]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_check_output_dir_refuses_what_cannot_be_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper") == (tmp_path / "new" / "deeper").resolve()
    with pytest.raises(CritlibError, match="existing file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(CritlibError, match="lies under the file"):
        check_output_dir(tmp_path / "f" / "x")


def test_staged_replaces_files_only_on_success(tmp_path):
    out = tmp_path / "out"
    with staged(out) as stage:
        (stage / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with staged(out) as stage:
            (stage / "a.txt").write_text("2")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_with_heldout_limits_the_windows(run_ctx):
    assert len(run_ctx.with_heldout(1).windows.heldout) == 1
    assert run_ctx.with_heldout(0) is run_ctx and run_ctx.with_heldout(99) is run_ctx


def test_fingerprint_checks_its_output_and_verify_its_dtype(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["fingerprint", "tiny-llama", "-o", str(tmp_path / "f" / "fp.json")]) == 2
    assert "cannot write the fingerprint file" in capsys.readouterr().err
    assert main(["fingerprint", "tiny-llama", "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["fingerprint", "tiny-llama", "-o", str(tmp_path / "fp.json")]) == 0
    assert main(["verify", "tiny-llama", str(tmp_path / "fp.json")]) == 0
    capsys.readouterr()
    assert main(["verify", "tiny-llama", str(tmp_path / "fp.json"), "--set", "dtype=bf16"]) == 2
    assert "drop --set dtype=bf16" in capsys.readouterr().err


