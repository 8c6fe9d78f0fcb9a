"""What a manifest records: each stage's time summed over its uses, the library versions in use, the commit."""

import subprocess
import time

import torch

from critlib.manifest import Timer, git_commit, host, versions
from tests.conftest import REPO


def test_timer_sums_the_time_of_each_stage():
    timer = Timer()
    for _ in range(2):
        with timer.stage("a"):
            time.sleep(0.02)
    with timer.stage("b"):
        pass
    assert timer.seconds["a"] >= 0.04 and 0 <= timer.seconds["b"] < timer.seconds["a"]


def test_versions_commit_and_host_name_what_ran():
    assert versions()["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = git_commit()  # None outside a git checkout; "-dirty" with uncommitted changes to tracked files
    assert (commit is None) == (head.returncode != 0)
    assert commit is None or commit.removesuffix("-dirty") == head.stdout.strip()
    assert host()["cpu_threads"] == torch.get_num_threads()
    assert host()["cpu_summary"].startswith(("compiled C (critlib/kernels/cpu.c, ", "torch ("))
