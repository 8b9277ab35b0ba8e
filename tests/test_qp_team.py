"""The GPU's QP logic on the CPU: csrc/qp_core.h run by teams of threads (tests/qp_team.cpp).

The CUDA backend runs ``qp_solve_one`` with one warp or one CTA per problem; the CPU build only ever
runs it with a team of one. ``qp_team`` runs the team code with std::threads (a barrier for the
team's sync, reductions through shared memory) and checks every result against the one-thread
solver: the same steps (within a few on degenerate problems, where ties break by summation
order), the same NaNs, feasible, equally optimal. Team sizes: 32 is the warp team of
the CUDA QP kernel, 2 and 3 give ragged loop splits, 128 is a CTA. Under ThreadSanitizer, for races:
``g++ -O1 -g -fsanitize=thread -std=c++20 -pthread -Icsrc tests/qp_team.cpp -o /tmp/qp_team``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "g++")


@pytest.fixture(scope="module")
def qp_team(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which(CXX) is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("qp_team") / "qp_team"
    src = ROOT / "tests" / "qp_team.cpp"
    cmd = [CXX, "-O2", "-std=c++20", "-pthread", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


@pytest.mark.parametrize(
    ("teams", "Ks", "problems"),
    [
        (
            "2,3,32",
            "1,2,3,5,8,17,33,64",
            "2",
        ),  # every K: the tails of the loops split over the team
        ("128", "8,64", "1"),  # a CTA-sized team, more threads than K
        ("128", "65,100", "2"),  # the CTA team of the GPU for K > 64
    ],
)
def test_team_solver_matches_the_serial_one(qp_team: Path, teams: str, Ks: str, problems: str):
    res = subprocess.run(
        [str(qp_team), "--teams", teams, "--K", Ks, "--problems", problems],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " 0 failed" in res.stdout


def test_bad_arguments_are_refused(qp_team: Path):
    """Exit 2 on bad arguments, not a pass with nothing checked."""
    res = subprocess.run(
        [str(qp_team), "--problems", "0"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
