"""Running the command line in-process from the CLI tests."""

from __future__ import annotations

from typing import Any

import pytest

from mtlsam_fast.cli import main

#: a few steps on a small MultiDigits: fast on any CPU
TINY = [
    "--n-train",
    "256",
    "--n-test",
    "128",
    "--batch-size",
    "32",
    "--width",
    "8",
    "--threads",
    "1",
    "--quiet",
]


def run(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``mtlsam-fast ARGV`` in this process: its exit code, stdout and stderr."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
