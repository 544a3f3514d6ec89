"""Command line: `python -m shared.cli COMMAND ...`. Exit 0 on success, 2 when a dataset is
rejected, 1 for anything else, always with a one-line message and never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from shared.ledger import LedgerError, open_ledger
from shared.settings import SettingsError, get_settings
from shared.status import runs_response


class CliError(Exception):
    """A failure the user can act on; printed as one line."""


def _status(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit), **({"state": args.state} if args.state else {})}
    response = runs_response(open_ledger(get_settings()), args.run, query)
    print(response.body)
    return 0 if response.status == 200 else 1


def _demo(args: argparse.Namespace) -> int:
    from shared.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared.cli", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="recent runs, or one run with its history")
    status.add_argument("run", nargs="?", help="a run id")
    status.add_argument("--state", help="only runs in this state")
    status.add_argument("--limit", type=int, default=20)
    status.set_defaults(handler=_status)

    demo = commands.add_parser("demo", help="run the end-to-end demo on the local backend")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args))
    except (CliError, SettingsError, LedgerError, OSError) as error:
        print(f"error: {error}".replace("\n", " "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
