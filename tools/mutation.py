"""Mutation testing of mtlsam_fast on a seeded, bounded sample of mutants per module.

mutmut (the `mutation` extra of pyproject.toml) generates the mutants: its one-token mutations of
operators, numbers, keywords, strings and assignments. This driver samples a fixed number of them
per module with a seeded generator, applies each one to a private copy of the repository (never
to the working tree), runs the module's fast test subset there and records whether the tests
killed it. The parent process imports torch and pytest once and forks one child per mutant, so a
mutant costs its tests, not torch's import.

    python tools/mutation.py ops weighting --sample 60 --seed 0 --label after
    python tools/mutation.py report            # bench/results/mutation/summary.md from the JSONs

A mutant is *killed* when its tests fail (or it breaks the import), *timeout* when they run past
`--timeout-factor` times the unmutated run (counted as killed: the mutant changed behaviour) and
*survived* when they pass. `bench/results/mutation/equivalent.json` names the survivors that no
test can kill (the mutant computes the same thing) with the reason, `unkilled.json` the others
with why no test kills them yet; the report lists both.
How to run it and what CI runs: docs/testing.md.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "mutation"


@dataclasses.dataclass(frozen=True)
class Module:
    """What to mutate and the test subset that must kill it (fast: a module's run takes
    minutes); entries of `tests` starting with "-" are pytest options."""

    sources: tuple[str, ...]
    tests: tuple[str, ...]


# Left out of the default sources: cuda_backend.py and triton_backend.py (their kernels run only
# on a GPU; Triton's interpreter on the CPU is too slow for a test subset; tests/gpu/ covers them),
# cpu_backend.py and qp.py (their suites, tests/test_cpp_backend.py and tests/test_qp.py, take
# minutes each: a sample of theirs is `--sources ... --tests ...` away).
MODULES: dict[str, Module] = {
    "ops": Module(
        sources=(
            "mtlsam_fast/ops/__init__.py",
            "mtlsam_fast/ops/_registry.py",
            "mtlsam_fast/ops/torch_backend.py",
            "mtlsam_fast/ops/philox.py",
        ),
        tests=(
            "tests/test_values_ops.py",
            "tests/test_ops.py",
            "-knot compiles_without_graph_breaks",  # torch.compile: minutes per run
        ),
    ),
    "weighting": Module(
        sources=tuple(
            sorted(
                str(p.relative_to(ROOT)) for p in (ROOT / "mtlsam_fast" / "weighting").glob("*.py")
            )
        ),
        tests=(
            "tests/test_values_weightings.py",
            "tests/test_weighting_methods.py",
            "tests/test_weighting_properties.py",
            "-knot compiles_without_graph_break",  # torch.compile: a minute per run
        ),
    ),
    "optim": Module(
        sources=(
            "mtlsam_fast/optim/base.py",
            "mtlsam_fast/optim/aggregate.py",
            "mtlsam_fast/optim/fmtl.py",
            "mtlsam_fast/optim/samo.py",
        ),
        tests=(
            "tests/test_found_inf.py",
            "tests/test_values_samo.py",
            "tests/test_off_default_paths.py",
            "tests/test_optim_behaviour.py",
        ),
    ),
    "buffers": Module(
        sources=("mtlsam_fast/buffers.py",),
        tests=(
            "tests/test_values_buffers.py",
            "tests/test_buffers.py",
            "tests/test_off_default_paths.py",
        ),
    ),
    "cli": Module(
        sources=("mtlsam_fast/cli.py", "mtlsam_fast/train.py"),
        tests=("tests/test_cli_wiring.py",),
    ),
}


@dataclasses.dataclass
class Mutant:
    file: str
    line: int  # 1-based
    index: int  # mutmut's index of the mutation on that line
    before: str
    after: str
    status: str = "untested"
    seconds: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}:{self.index}"


def _message_lines(source: str) -> set[int]:
    """Lines of `raise` statements and `warnings.warn(...)` calls: mutating the text of an error
    message changes no behaviour the library promises (tests match messages only loosely)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        is_warn = (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "warn"
        )
        if isinstance(node, ast.Raise) or is_warn:
            end = node.end_lineno or node.lineno
            lines.update(range(node.lineno, end + 1))
    return lines


def _is_string_mutation(before: str, after: str) -> bool:
    return after.replace("XX", "") == before and "XX" in after


def enumerate_mutants(path: str) -> list[Mutant]:
    """Every mutmut mutant of one file (one parse; the mutated text is filled in by
    `describe`)."""
    from mutmut import Context, list_mutations

    source = (ROOT / path).read_text()
    return [
        Mutant(path, mid.line_number + 1, mid.index, mid.line.strip(), "")
        for mid in list_mutations(Context(source=source, filename=path))
    ]


def mutated_source(mutant: Mutant) -> str:
    from mutmut import Context, RelativeMutationID, mutate

    source = (ROOT / mutant.file).read_text()
    line = source.split("\n")[mutant.line - 1]
    mid = RelativeMutationID(line, mutant.index, mutant.line - 1, mutant.file)
    mutated, n = mutate(Context(source=source, filename=mutant.file, mutation_id=mid))
    if n != 1:
        raise RuntimeError(f"mutant {mutant.id} did not apply")
    return mutated


def describe(mutant: Mutant) -> bool:
    """Fill in the mutated line; False for a string mutation inside an error message."""
    source = (ROOT / mutant.file).read_text()
    before, after = source.split("\n"), mutated_source(mutant).split("\n")
    if len(after) != len(before):
        mutant.after = "(line removed)"
        return True
    mutant.after = after[mutant.line - 1].strip()
    messages = _message_lines(source)
    return not (mutant.line in messages and _is_string_mutation(mutant.before, mutant.after))


def sample_mutants(module: Module, n: int, seed: int) -> tuple[int, list[Mutant]]:
    """(population size, the first n mutants of a seeded shuffle that are not message texts)."""
    population = [m for f in module.sources for m in enumerate_mutants(f)]
    random.Random(seed).shuffle(population)
    chosen: list[Mutant] = []
    for m in population:
        if len(chosen) == n:
            break
        if describe(m):
            chosen.append(m)
    return len(population), chosen


def apply(mutant: Mutant, root: Path) -> str:
    """Write the mutated file under `root`; returns the original text (to restore)."""
    original = (ROOT / mutant.file).read_text()
    (root / mutant.file).write_text(mutated_source(mutant))
    return original


def make_copy() -> Path:
    """A private copy of the repository's tracked and untracked files plus the compiled
    extension; `mtlsam_fast/triton_kernels` links to `triton_kernels/` as the install maps it."""
    tmp = Path(tempfile.mkdtemp(prefix="mtlsam_mutation_"))
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "mtlsam_fast").glob("_C*.so")]
    for f in files:
        src = ROOT / f
        if src.is_file():
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / f)
    (tmp / "mtlsam_fast" / "triton_kernels").symlink_to(tmp / "triton_kernels")
    return tmp


def run_tests(root: Path, tests: list[str], log: Path, timeout: float | None) -> tuple[str, float]:
    """Fork, import mtlsam_fast from `root` and run `tests` with pytest there: "passed",
    "failed" or "timeout", and the seconds it took."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.setpgid(0, 0)
        os.chdir(root)
        sys.path.insert(0, str(root))
        sys.dont_write_bytecode = True  # a mutated file must never be read from a stale .pyc
        import pytest

        args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
        code = pytest.main(args)
        sys.stdout.flush()
        os._exit(int(code))
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        elapsed = time.perf_counter() - start
        if done:
            code = os.waitstatus_to_exitcode(status)
            return ("passed" if code == 0 else "failed"), elapsed
        if timeout is not None and elapsed > timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", elapsed
        time.sleep(0.05)


def run_module(
    name: str,
    sample: int,
    seed: int,
    label: str,
    timeout_factor: float,
    previous: str | None,
    tests: list[str] | None,
    resume: bool = False,
) -> dict:
    """Run one module's sample, writing MODULE.LABEL.json after each mutant (an interrupted run
    keeps what it measured: the mutants not reached stay "untested"). With `previous` (an earlier
    label of the same sample), only that run's survivors run again, against `tests` (default the
    module's subset), and its kills are carried over: give the tests added or changed since, the
    others already passed on those survivors. `resume`: finish this label's interrupted run."""
    module = MODULES[name]
    tests = tests or [t for t in module.tests if t.startswith("-") or (ROOT / t).exists()]
    population, chosen = sample_mutants(module, sample, seed)
    carried: dict[str, str] = {}
    if resume:  # this label's earlier, interrupted run: keep what it measured
        old = json.loads((RESULTS / f"{name}.{label}.json").read_text())
        if [m["id"] for m in old["mutants"]] != [m.id for m in chosen]:
            raise SystemExit(f"{name}.{label}.json is another sample: cannot resume it")
        carried = {m["id"]: m["status"] for m in old["mutants"] if m["status"] != "untested"}
        previous = old["kills_carried_from"]
    elif previous is not None:
        old = json.loads((RESULTS / f"{name}.{previous}.json").read_text())
        if [m["id"] for m in old["mutants"]] != [m.id for m in chosen]:
            raise SystemExit(
                f"{name}.{previous}.json is another sample (seed, size or the sources changed)"
            )
        carried = {m["id"]: m["status"] for m in old["mutants"] if m["status"] != "survived"}
    root = make_copy()
    try:
        log = root / "pytest.log"
        status, baseline = run_tests(root, tests, log, None)
        if status != "passed":
            raise SystemExit(f"{name}: the unmutated tests fail, see {log}:\n{log.read_text()}")
        timeout = timeout_factor * baseline + 10
        print(f"{name}: {population} mutants, sample {len(chosen)}, tests {baseline:.0f} s")
        report = {
            "module": name,
            "label": label,
            "seed": seed,
            "population": population,
            "sample": len(chosen),
            "sources": list(module.sources),
            "tests": tests,
            "unmutated_test_seconds": round(baseline, 1),
            "kills_carried_from": previous,
            "mutants": [],
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{name}.{label}.json"
        for i, m in enumerate(chosen):
            if m.id in carried:
                m.status = carried[m.id]
            else:
                original = apply(m, root)
                try:
                    result, m.seconds = run_tests(root, tests, log, timeout)
                finally:
                    (root / m.file).write_text(original)
                m.status = {"passed": "survived", "failed": "killed"}.get(result, result)
                print(
                    f"  [{i + 1}/{len(chosen)}] {m.status:8s} {m.id}  {m.before!r} -> {m.after!r}"
                )
                sys.stdout.flush()
            report["mutants"] = [dataclasses.asdict(m) | {"id": m.id} for m in chosen]
            out.write_text(json.dumps(report, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report


def score(report: dict, equivalent: dict[str, str]) -> tuple[int, int, int]:
    """(killed incl. timeouts, equivalent survivors, mutants tested)."""
    tested = [m for m in report["mutants"] if m["status"] != "untested"]
    killed = sum(m["status"] in ("killed", "timeout") for m in tested)
    eq = sum(m["status"] == "survived" and m["id"] in equivalent for m in tested)
    return killed, eq, len(tested)


#: the order in which a module's runs supersede each other in the survivors' list
LABEL_ORDER = ("before", "after", "suites")


def write_summary() -> Path:
    """bench/results/mutation/summary.md: a row per result file; the survivors of each module's
    last run (LABEL_ORDER), each with its reason from equivalent.json or unkilled.json."""
    equivalent = json.loads((RESULTS / "equivalent.json").read_text())
    unkilled = json.loads((RESULTS / "unkilled.json").read_text())
    reports = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.*.json"))]
    reports.sort(key=lambda r: (r["module"], LABEL_ORDER.index(r["label"])))
    lines = [
        "# Mutation scores",
        "",
        "Written by `python tools/mutation.py report` from the result files beside it; how to",
        "run a sample: docs/testing.md. Score = killed / (tested - equivalent survivors).",
        "`before`: the module's fast tests as they were; `after`: the survivors of `before`",
        "against the tests added since; `suites`: the survivors against slower suites.",
        "Mutant ids (`file:line:index`) refer to the sources as they were sampled.",
        "",
        "| module | label | seed | population | tested | killed | equivalent | survived | score |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    last: dict[str, dict] = {}
    for r in reports:
        killed, eq, n = score(r, equivalent)
        pct = 100.0 * killed / max(n - eq, 1)
        lines.append(
            f"| {r['module']} | {r['label']} | {r['seed']} | {r['population']} | {n} | {killed} "
            f"| {eq} | {n - killed - eq} | {pct:.0f} % |"
        )
        last[r["module"]] = r
    lines += ["", "## Survivors of each module's last run", ""]
    for name, r in last.items():
        for m in r["mutants"]:
            if m["status"] != "survived":
                continue
            why = equivalent.get(m["id"])
            why = f"equivalent: {why}" if why else f"not killed: {unkilled.get(m['id'], '?')}"
            lines.append(f"- {name}/{r['label']} `{m['id']}` `{m['before']}` → `{m['after']}`")
            lines.append(f"  — {why}")
    out = RESULTS / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("modules", nargs="+", help=f"'report' or any of {', '.join(MODULES)}")
    p.add_argument("--sample", type=int, default=60, help="mutants per module (default 60)")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    p.add_argument("--label", default="run", help="names the result file MODULE.LABEL.json")
    p.add_argument("--timeout-factor", type=float, default=2.0)
    p.add_argument("--tests", nargs="+", help="test files to run instead of the module's subset")
    p.add_argument(
        "--retest-survivors-of",
        metavar="LABEL",
        help="run only the survivors of MODULE.LABEL.json again (same seed and sample)",
    )
    p.add_argument("--resume", action="store_true", help="run only MODULE.LABEL.json's untested")
    p.add_argument("--list", action="store_true", help="print the sampled mutants, run nothing")
    args = p.parse_args(argv)
    if args.modules == ["report"]:
        print(write_summary())
        return
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        p.error(f"unknown module(s) {sorted(unknown)}; choose from {list(MODULES)}")
    # imported once here so that each forked child pays only for its tests
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401

    for name in args.modules:
        if args.list:
            for m in sample_mutants(MODULES[name], args.sample, args.seed)[1]:
                print(f"{m.id}  {m.before!r} -> {m.after!r}")
            continue
        run_module(
            name,
            args.sample,
            args.seed,
            args.label,
            args.timeout_factor,
            args.retest_survivors_of,
            args.tests,
            args.resume,
        )


if __name__ == "__main__":
    main()
