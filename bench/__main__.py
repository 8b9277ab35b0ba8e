"""``python -m bench``: the op sweep report (also ``python -m bench ops``); the subcommands
``e2e`` (the end-to-end optimizer step), ``integrations`` (the peers' own methods against ours
through the adapters), ``dist`` (the step in 1 and 2 processes, bytes communicated), ``load`` (the
weightings on a busy CPU) and ``peers`` (each weighting against its peer's implementation)."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> module of this package with ``add_arguments(parser)`` and ``main(args)``
SUBCOMMANDS = {
    "ops": "report",
    "e2e": "e2e",
    "integrations": "integrations",
    "dist": "dist",
    "load": "load",
    "peers": "peer_times",
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str], object]:
    """The parser of the subcommand that ``argv`` names (the op sweep when it names none), the
    arguments left for it, and its module."""
    name = argv[0] if argv and argv[0] in SUBCOMMANDS else "ops"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    module = importlib.import_module(f"{__package__}.{SUBCOMMANDS[name]}")
    if name == "ops":
        prog = "python -m bench"
        description = (
            "Op sweep: every op x backend x dtype x K x P, with roofline and baselines. "
            f"Subcommands: {', '.join(n for n in SUBCOMMANDS if n != 'ops')} "
            "(python -m bench SUBCOMMAND --help)."
        )
    else:
        prog, description = f"python -m bench {name}", (module.__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog=prog, description=description)
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser, rest, module


def main(argv: list[str] | None = None) -> int:
    parser, rest, module = build_parser(list(sys.argv[1:] if argv is None else argv))
    return module.main(parser.parse_args(rest))  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
