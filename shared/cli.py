"""Command line: `python -m shared.cli COMMAND ...`. Exit 0 on success, 2 when a dataset is
rejected, 1 for anything else, always with a one-line message and never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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


def _progress_printer(total: int) -> Callable[[int], None] | None:
    """A one-line progress bar on a terminal, for inputs large enough to wait for."""
    if not sys.stderr.isatty() or total < 50 * 1024 * 1024:
        return None

    def show(done: int) -> None:
        filled = int(30 * done / total)
        end = "\n" if done >= total else ""
        sys.stderr.write(
            f"\rpreparing [{'#' * filled}{'.' * (30 - filled)}] {done / total:4.0%} of {total / 1e6:,.0f} MB{end}"
        )

    return show


def _prepare(args: argparse.Namespace) -> int:
    from shared.datasets.prepare import InputInfo, prepare_dataset, read_overrides
    from shared.datasets.sources import file_chunks
    from shared.training import ParameterError

    source = Path(args.input)
    if not source.is_file():
        raise CliError(f"{source}: {'is a directory' if source.is_dir() else 'no such file'}")
    overrides = {key: value for key, value in (("test_pc", args.test_pc), ("sample_pc", args.sample_pc)) if value}
    try:
        read_overrides(overrides, get_settings().dataset)
    except ParameterError as error:
        raise CliError(str(error)) from None
    size = source.stat().st_size
    with source.open("rb") as data:
        result = prepare_dataset(
            file_chunks(data), Path(args.out), InputInfo(str(source), size), get_settings().dataset, overrides,
            on_progress=_progress_printer(size),
        )  # fmt: skip
    if not result.accepted:
        print(f"{source}: rejected: {result.reason}", file=sys.stderr)
        for problem in result.first_problems:
            print(problem, file=sys.stderr)
    print(json.dumps({"status": result.report["status"], "reason": result.reason, "out": str(result.out_dir),
                      **{key: result.report["split"][key] for key in ("train", "test")}}))  # fmt: skip
    return 0 if result.accepted else 2


def _demo(args: argparse.Namespace) -> int:
    from shared.demo import run_demo

    return run_demo()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # Exit 2 means "dataset rejected" here, so usage errors exit 1 instead of argparse's 2.
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m shared.cli", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="recent runs, or one run with its history")
    status.add_argument("run", nargs="?", help="a run id")
    status.add_argument("--state", help="only runs in this state")
    status.add_argument("--limit", type=int, default=20)
    status.set_defaults(handler=_status)

    prepare = commands.add_parser("prepare", help="validate and split a dataset file into DIR")
    prepare.add_argument("input", help="a .jsonl, .jsonl.gz or .parquet chat dataset")
    prepare.add_argument("--out", required=True, help="folder for train_sft.jsonl, test_sft.jsonl, report.json")
    prepare.add_argument("--test-pc", help="percentage of conversations held out for test (default 5)")
    prepare.add_argument("--sample-pc", help="percentage of conversations to keep at all (default 100)")
    prepare.set_defaults(handler=_prepare)

    demo = commands.add_parser("demo", help="run the end-to-end demo on the local backend")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from azure.core.exceptions import AzureError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args))
    except (CliError, SettingsError, LedgerError, OSError, AzureError) as error:
        print(f"error: {error}".replace("\n", " "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
