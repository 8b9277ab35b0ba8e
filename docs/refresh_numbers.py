"""Re-run the commands whose numbers the documentation shows, and rewrite ``docs/results.md``.

    python docs/refresh_numbers.py                    # every block (the compare takes minutes)
    python docs/refresh_numbers.py train-default      # one block
    python docs/refresh_numbers.py --check train-default   # re-run and compare, write nothing
    python docs/refresh_numbers.py --render           # re-draw the compare tables from their JSON

Each block of ``docs/results.md`` lies between ``<!-- numbers:NAME -->`` and
``<!-- /numbers:NAME -->``: the command, then what it printed (a ``train`` block), or the table of
the compare JSON it wrote, committed next to this file in ``docs/results/`` (a ``compare``
block). ``tests/test_numbers.py`` re-runs the quick deterministic ones and checks that the tables
are those of the committed JSON; README.md may hold copies of these blocks between the same
markers, which the test holds to be identical.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Block:
    name: str
    command: str  # as a user types it
    json: str | None = None  # compare blocks: the JSON it writes, relative to docs/

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command)[1:]  # without "mtlsam-fast"


BLOCKS = {
    b.name: b
    for b in (
        Block("train-default", "mtlsam-fast train"),
        Block(
            "compare-noise",
            "mtlsam-fast compare --methods ls,fmtl-ls,mgda,fmtl-mgda,samo-mgda --seeds 0,1,2 "
            "--noise-rate 0.4",
            json="results/compare-noise0.4.json",
        ),
    )
}


def block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"<!-- numbers:{re.escape(name)} -->\n(.*?)<!-- /numbers:{re.escape(name)} -->\n", re.S
    )


def read_blocks(text: str) -> dict[str, str]:
    """NAME -> contents of every numbers block in ``text``."""
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"<!-- numbers:([\w.-]+) -->\n(.*?)<!-- /numbers:\1 -->\n", text, re.S)
    }


def run_cli(argv: list[str]) -> str:
    """stdout of ``mtlsam-fast ARGV`` run in this process (a SystemExit-free call)."""
    from mtlsam_fast import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"mtlsam-fast {' '.join(argv)} failed with exit status {code}")
    return out.getvalue()


def checked_lines(text: str) -> list[str]:
    """The lines of a train block that must reproduce exactly: the data set, the per-task
    accuracies and losses, the mean and Δm (not the timings or the file names)."""
    skip = ("$ ", "method ", "result written", "checkpoint written", "```")
    return [ln for ln in text.splitlines() if ln and not ln.startswith(skip)]


def train_block(block: Block) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        printed = run_cli([*block.argv, "-o", str(Path(tmp) / "r.json"), "-q"])
    lines = [ln for ln in printed.splitlines() if not ln.startswith("result written")]
    return "```text\n$ " + block.command + "\n" + "\n".join(lines) + "\n```\n"


def markdown_table(result: dict) -> str:
    """The compare table of a compare JSON, as markdown: the CLI's cells (:func:`compare_rows`)
    without the wall-clock ms/step, which on a shared machine measures the other work."""
    from mtlsam_fast.cli import compare_rows

    rows = compare_rows(result)
    wall = rows[0].index("ms/step")
    rows = [r[:wall] + r[wall + 1 :] for r in rows]
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out) + "\n"


def compare_block(block: Block, result: dict) -> str:
    env = next(iter(result["runs"].values()))[0]["environment"]
    return (
        f"```bash\n{block.command}\n```\n\n"
        + markdown_table(result)
        + f"\n{result['dataset']['summary']}; {next(iter(result['runs'].values()))[0]['steps']} "
        f"steps per run; Δm% vs {result['baseline']['method']} (mean over seeds); torch "
        f"{env['torch']}, {env['threads']} thread(s), CPU capability {env['cpu_capability']}. "
        f"JSON: `docs/{block.json}`, plot: `docs/{Path(block.json).with_suffix('.png')}`.\n"
    )


def refresh(names: list[str], render_only: bool = False) -> None:
    text = RESULTS.read_text()
    for name in names:
        block = BLOCKS[name]
        if block.json is None:
            if render_only:
                continue
            body = train_block(block)
        else:
            path = HERE / block.json
            if not render_only:
                run_cli([*block.argv, "-o", str(path), "--overwrite", "-q"])
            body = compare_block(block, json.loads(path.read_text()))
        new = f"<!-- numbers:{name} -->\n{body}<!-- /numbers:{name} -->\n"
        pattern = block_pattern(name)
        text = pattern.sub(lambda m, new=new: new, text) if pattern.search(text) else text + new
        print(f"{name}: refreshed")
    RESULTS.write_text(text)


def check(names: list[str]) -> int:
    blocks = read_blocks(RESULTS.read_text())
    failed = 0
    for name in names:
        block = BLOCKS[name]
        if block.json is not None:
            print(f"{name}: a compare block (minutes); refresh it instead")
            continue
        want, got = checked_lines(blocks[name]), checked_lines(train_block(block))
        if want != got:
            failed += 1
            print(f"{name}: differs\n  documented: {want}\n  now:        {got}")
        else:
            print(f"{name}: reproduced")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"blocks to refresh (default: all of {list(BLOCKS)})")
    ap.add_argument("--check", action="store_true", help="re-run and compare; write nothing")
    ap.add_argument(
        "--render",
        action="store_true",
        help="only re-render the compare blocks from their committed JSON (no run)",
    )
    args = ap.parse_args(argv)
    names = args.names or list(BLOCKS)
    unknown = [n for n in names if n not in BLOCKS]
    if unknown:
        ap.error(f"unknown blocks {unknown}; known: {list(BLOCKS)}")
    if args.check:
        return check(names)
    refresh(names, render_only=args.render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
