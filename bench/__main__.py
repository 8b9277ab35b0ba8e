"""``python -m bench``: the op sweep report; ``python -m bench e2e``: the end-to-end step
benchmark; ``python -m bench dist``: the step in 1 and 2 processes, bytes communicated."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "e2e":
        from . import e2e

        ap = argparse.ArgumentParser(
            prog="python -m bench e2e", description=e2e.__doc__.splitlines()[0]
        )
        e2e.add_arguments(ap)
        return e2e.main(ap.parse_args(argv[1:]))
    if argv and argv[0] == "dist":
        from . import dist

        ap = argparse.ArgumentParser(
            prog="python -m bench dist", description=dist.__doc__.splitlines()[0]
        )
        dist.add_arguments(ap)
        return dist.main(ap.parse_args(argv[1:]))
    if argv and argv[0] == "ops":
        argv = argv[1:]
    from . import report

    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Op sweep: every op x backend x dtype x K x P, with roofline and baselines. "
        "Subcommand 'e2e' runs the end-to-end optimizer-step benchmark "
        "(python -m bench e2e --help).",
    )
    report.add_arguments(ap)
    return report.main(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
