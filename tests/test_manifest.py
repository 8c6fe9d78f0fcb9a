"""What a manifest records: each stage's time summed over its uses, the library versions in use, the commit."""

import re
import time

import torch

from critlib.manifest import Timer, git_commit, host, versions


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
    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert host()["cpu_threads"] == torch.get_num_threads()
