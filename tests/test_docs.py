"""The documentation cannot rot: every Python code block of README.md and docs/*.md runs, and every
``mtlsam-fast`` command line in a shell block is accepted by the CLI's parser.

Python blocks of one file run in order in one namespace (a block may use what an earlier block of
the same file defined), on the CPU, in a temporary working directory. A block whose info string is
``python no-run`` is only compiled (for snippets that need a GPU or several processes; each such
block says where it is tested instead).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(info string, code, first line number) of every fenced block of ``path``."""
    text = path.read_text()
    return [
        (m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 2)
        for m in FENCE.finditer(text)
    ]


def python_files() -> list[Path]:
    return [p for p in DOCS if any(info.split()[:1] == ["python"] for info, _, _ in blocks(p))]


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["doc"])
    namespace: dict[str, object] = {"__name__": "__doc__"}
    for info, code, line in blocks(path):
        words = info.split()
        if words[:1] != ["python"]:
            continue
        name = f"{path.relative_to(ROOT)}:{line}"
        compiled = compile(code, name, "exec")
        if "no-run" in words[1:]:
            continue
        exec(compiled, namespace)


def shell_commands() -> list[tuple[str, list[str]]]:
    """Every ``mtlsam-fast ...`` command in the shell blocks."""
    found = []
    for path in DOCS:
        for info, code, line in blocks(path):
            if info.split()[:1] not in (["bash"], ["sh"], ["console"], []):
                continue
            for i, raw in enumerate(code.replace("\\\n", " ").splitlines()):
                cmd = raw.split(" #")[0].strip().removeprefix("$ ")
                for prefix in ("mtlsam-fast ", "python -m mtlsam_fast "):
                    if cmd.startswith(prefix) and "&&" not in cmd and "|" not in cmd:
                        where = f"{path.relative_to(ROOT)}:{line + i}"
                        found.append((where, shlex.split(os.path.expandvars(cmd))))
    return found


def test_the_documented_commands_are_found() -> None:
    """The command scan itself works (a silent empty scan would make the test below vacuous)."""
    assert any(argv == ["mtlsam-fast", "train"] for _, argv in shell_commands())


@pytest.mark.parametrize("where, argv", shell_commands(), ids=[w for w, _ in shell_commands()])
def test_documented_commands_parse(where: str, argv: list[str]) -> None:
    from mtlsam_fast import cli

    args = argv[1:] if argv[0] == "mtlsam-fast" else argv[3:]
    try:
        cli.build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: {' '.join(argv)} is rejected by the CLI's parser (exit {e.code})")


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table under ``heading`` (header and separator rows left out)."""
    section = text[text.index(heading) :]
    rows: list[list[str]] = []
    for raw in section.splitlines()[1:]:
        if raw.startswith("|"):
            rows.append([c.strip() for c in raw.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def test_readme_method_table_lists_every_weighting() -> None:
    """README's method table has one row per registered weighting, in the registry's order, each
    with a paper link (or a closed form), an input kind and an oracle."""
    from mtlsam_fast import weighting

    rows = table_rows((ROOT / "README.md").read_text(), "## Methods")
    assert [r[0].strip("`") for r in rows] == weighting.names()
    for name, method, kind, checked in rows:
        assert kind.split()[0] in {"Gram", "gradients", "losses", "the"}, (name, kind)
        assert checked, name
        assert "](http" in method or name == "`ls`", name


def test_weighting_options_table_matches_the_classes() -> None:
    """docs/weightings.md's options table is the classes' own signatures (names and defaults)."""
    import inspect

    from mtlsam_fast import weighting

    rows = table_rows((ROOT / "docs" / "weightings.md").read_text(), "## Options")
    assert [r[0].strip("`") for r in rows] == weighting.names()
    for name, cls_name, options in rows:
        cls = type(weighting.get(name.strip("`")))
        assert cls.__name__ == cls_name.strip("`")
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        want = ", ".join(f"`{p.name}={p.default!r}`" for p in params if p.name != "backend")
        assert options == (want or "—"), name


def repository_text_files() -> list[Path]:
    """The tracked source, test, benchmark and documentation files."""
    import subprocess

    out = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.h", "*.cpp", "*.cu", "*.sh", "*.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / f for f in out]


def test_code_and_docs_cite_only_files_inside_the_repository() -> None:
    """Nothing cites the original design note that lives outside the repository; every citation
    of docs/ARCHITECTURE.md names a section it has."""
    files = repository_text_files()
    assert any(f.name == "base.py" for f in files)  # the listing itself works
    arch = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", arch, re.M))
    cite = re.compile(r"ARCHITECTURE\.md,? (?:§|section )(\d+)")
    outside = "DESIGN" + ".md"  # spelled so that this file does not cite it either
    for f in files:
        text = f.read_text(errors="replace")
        assert outside not in text, f"{f.relative_to(ROOT)} cites {outside}"
        for n in cite.findall(text):
            assert n in sections, f"{f.relative_to(ROOT)} cites docs/ARCHITECTURE.md §{n}"
