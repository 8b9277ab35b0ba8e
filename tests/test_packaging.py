"""The built wheel: the package layout and the declared runtime dependencies (pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, MTLSAM_NO_EXTENSION="1")  # the layout, not the extension build
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(ROOT),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("mtlsam_fast-*.whl")
    return zipfile.ZipFile(path)


def test_triton_kernels_install_inside_the_package(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"mtlsam_fast"}, tops  # no top-level triton_kernels (Triton ships its own)
    sources = {p.name for p in (ROOT / "triton_kernels").glob("*.py")}
    assert sources == {
        n.rsplit("/", 1)[1] for n in names if n.startswith("mtlsam_fast/triton_kernels/")
    }


def test_every_subpackage_is_packaged(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for init in (ROOT / "mtlsam_fast").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} is missing from the wheel: add its package to pyproject.toml"


def test_runtime_dependencies_are_torch_and_numpy(wheel: zipfile.ZipFile) -> None:
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in wheel.read(meta).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    runtime = sorted(
        r.split(">")[0].split("<")[0].split("=")[0].strip() for r in requires if "extra ==" not in r
    )
    assert runtime == ["numpy", "torch"], requires
