"""Command line: `python -m shared.cli COMMAND ...`. Exit 0 on success, 2 when a dataset is
rejected, 1 for anything else, always with a one-line message and never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.backends.registry import BACKENDS, plugin
from shared.ledger import LedgerError, is_run_id, migrate_ledger, open_ledger
from shared.settings import Settings, SettingsError, get_settings
from shared.status import runs_response
from shared.validation import JOB_NAME, MODEL_NAME, MODEL_VERSION, RESOURCE_NAME, Rule
from shared.vocabulary import (
    MANAGED_BY,
    MANAGED_BY_TAG,
    JobStatus,
)

if TYPE_CHECKING:
    from shared.backends.azureml.backend import AzureMLBackend
    from shared.backends.interface import JobRequest
    from shared.backends.local.backend import LocalBackend
    from shared.datasets.prepare import Preparation


class CliError(Exception):
    """A failure the user can act on; printed as one line."""


def _status(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit), **({"state": args.state} if args.state else {})}
    with _ledger_storage() as settings:
        response = runs_response(open_ledger(settings), args.run, query)
    print(response.body)
    return 0 if response.status == 200 else 1


def _migrate_ledger(args: argparse.Namespace) -> int:
    with _ledger_storage() as settings:
        print(json.dumps(asdict(migrate_ledger(settings))))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from shared.status import rollback_response

    with _ledger_storage() as settings:
        response = rollback_response(settings, open_ledger(settings), args.endpoint)
    if response.status != 200:
        raise CliError(json.loads(response.body)["error"])
    print(response.body)
    return 0


@contextmanager
def _ledger_storage() -> Iterator[Settings]:
    """The storage the runs are in: AzureWebJobsStorage when set; otherwise the local host's or the
    demo's store under .local/ (started for the query if its Azurite is gone)."""
    import socket

    from shared.dev.azurite import local_store
    from shared.settings import STORAGE_SETTING, load_settings

    settings = get_settings()
    if os.environ.get(STORAGE_SETTING):
        yield settings
        return
    with local_store() as connection:
        if connection is not None:
            yield load_settings({**os.environ, STORAGE_SETTING: connection})
            return
    with socket.socket() as probe:  # UseDevelopmentStorage=true: an Azurite on its default ports
        probe.settimeout(1)
        if probe.connect_ex(("127.0.0.1", 10002)) != 0:
            raise CliError(
                "no runs to read: no local store under .local/ and nothing listens on 127.0.0.1:10002; "
                "run `make demo` or `python -m shared.cli host --azurite`, or set AzureWebJobsStorage"
            )
    yield settings


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
    from shared.datasets.parts import prepare_file
    from shared.datasets.prepare import InputInfo, read_overrides
    from shared.training import ParameterError

    source = Path(args.input)
    if not source.is_file():
        raise CliError(f"{source}: {'is a directory' if source.is_dir() else 'no such file'}")
    overrides = {key: value for key, value in (("test_pc", args.test_pc), ("sample_pc", args.sample_pc)) if value}
    for assignment in args.map or []:
        ours, equals, theirs = assignment.partition("=")
        if not equals:
            raise CliError(f"--map {assignment!r}: expected <field>=<column>, such as user=question")
        overrides[f"map_{ours.strip()}"] = theirs
    try:
        read_overrides(overrides, get_settings().dataset)
    except ParameterError as error:
        raise CliError(str(error)) from None
    size = source.stat().st_size
    result = prepare_file(source, Path(args.out), InputInfo(str(source), size), get_settings().dataset, overrides,
                          on_progress=_progress_printer(size))  # fmt: skip
    if result.accepted and args.tokenizer:
        _count_exactly(result, args.tokenizer)
    if not result.accepted:
        print(f"{source}: rejected: {result.reason}", file=sys.stderr)
        for problem in result.first_problems:
            print(problem, file=sys.stderr)
    print(json.dumps({"status": result.report["status"], "reason": result.reason, "out": str(result.out_dir),
                      **{key: result.report["split"][key] for key in ("train", "test")}}))  # fmt: skip
    return 0 if result.accepted else 2


def _count_exactly(result: Preparation, source: str) -> None:
    """Token counts with `source`'s tokenizer (a folder, or a Hugging Face id in the local cache)."""
    from shared.datasets.prepare import rewrite_report
    from shared.datasets.tokens import count_into_report

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        raise CliError(f"--tokenizer {source}: cannot load it here ({' '.join(str(error).split())[:200]})") from None
    count_into_report(result, tokenizer)
    statistics = result.report["statistics"]
    rewrite_report(result)
    _progress(f"{statistics['tokens']['total']} tokens ({statistics['tokens']['method']}); "
              f"{statistics['training_tokens']['total']} training tokens")  # fmt: skip


def _local_backend() -> LocalBackend:
    from shared.backends.local.backend import LocalBackend

    settings = get_settings()
    if settings.ml_backend != "local":
        raise CliError(f"this command drives the local backend; ML_BACKEND is {settings.ml_backend}")
    return LocalBackend(settings)


def _emit(payload: Any) -> None:
    """The machine-readable last line of a command."""
    print(json.dumps(payload))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _overrides(assignments: list[str] | None) -> dict[str, Any]:
    """Training parameters from repeated `--set key=value`, checked against the schema."""
    from shared.training import ParameterError, parse_parameter

    overrides = {}
    for assignment in assignments or []:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise CliError(f"--set {assignment!r}: expected key=value")
        try:
            overrides[key.strip()] = parse_parameter(key.strip(), value)
        except ParameterError as error:
            raise CliError(str(error)) from None
    return overrides


def _submit(args: argparse.Namespace) -> int:
    """Submit prepared data to a backend; with --dry-run (Azure ML), print the job body instead."""
    from shared.backends.interface import JobRequest
    from shared.backends.registry import get_backend
    from shared.settings import load_settings
    from shared.vocabulary import PREPARED_CONTAINER, TEST_FILE, TRAIN_FILE

    settings = load_settings({**os.environ, "ML_BACKEND": args.backend or get_settings().ml_backend})
    in_azure = plugin(settings.ml_backend).runs_in_azure
    prepared = args.prepared
    if "://" not in prepared:
        folder = Path(prepared).resolve()
        for name in (TRAIN_FILE, TEST_FILE):
            if not (folder / name).is_file():
                raise CliError(f"{folder / name}: no such file; --prepared must be a folder written by 'prepare'")
        if in_azure:
            from shared.backends.azureml.settings import Workspace, prepared_uri, workspace_settings

            prepared = prepared_uri(workspace_settings(settings, Workspace).datastore, folder.name)
            _progress(f"note: Azure ML reads the files from {prepared}/ (the {PREPARED_CONTAINER} container, "
                      f"folder {folder.name}/): upload them there before a real submission")  # fmt: skip
        else:
            prepared = str(folder)
    name = Path(args.prepared.rstrip("/")).name or "chat"
    request = JobRequest(args.job or f"ft-{name}", prepared, name, _overrides(args.set))
    if args.dry_run:
        if not in_azure:
            raise CliError("--dry-run shows an Azure ML job body: use --backend azureml or azureml-finetune")
        _dry_run(settings, request, Path(args.prepared), args.vm_size, args.region)
        return 0
    status = get_backend(settings).submit(request)
    _emit(asdict(status))
    return 0


def _dry_run(settings: Settings, request: JobRequest, prepared: Path, vm_size: str | None, region: str | None) -> None:
    """The request the SDK would send to create the job, and nothing sent; for the pipeline, the
    estimate and checks beside it."""
    from shared.backends.azureml.backend import AzureMLBackend
    from shared.backends.azureml.settings import Workspace, workspace_settings
    from shared.backends.registry import get_backend

    workspace = workspace_settings(settings, Workspace)
    backend = get_backend(settings)
    body = backend.dry_run(request)  # type: ignore[attr-defined]  # both Azure ML backends have one
    _progress(f"PUT https://management.azure.com{workspace.resource_id}/jobs/{request.job_name}")
    print(json.dumps(body, indent=2))
    if isinstance(backend, AzureMLBackend):
        _dry_run_checks(backend, request, prepared, vm_size, region)


def _dry_run_checks(backend: AzureMLBackend, request: JobRequest, prepared: Path, vm_size: str | None,
                    region: str | None) -> None:  # fmt: skip
    """Beside the pipeline job's body: the estimate from the prepared report and the facts given,
    and what each check says or why it cannot say it without the network."""
    from shared.costs.estimate import budget_refusal
    from shared.vocabulary import REPORT_FILE

    settings = backend.settings
    budget = settings.dataset.max_training_cost_usd
    report_file = prepared / REPORT_FILE
    if not report_file.is_file() or not vm_size:
        _progress(f"estimate: needs {REPORT_FILE} in --prepared (written by 'prepare') and --vm-size (the cluster's)")
        return
    report = json.loads(report_file.read_text())
    gpus = backend.workspace_settings.gpus_per_node or 1
    estimate = backend.estimate_on(report["statistics"]["training_tokens"]["total"], request.parameters,
                                   settings.base_model.partition(":")[0], vm_size, gpus, region)  # fmt: skip
    _progress(f"estimate: {json.dumps(estimate.as_dict())}")
    verdict = budget_refusal(estimate, budget) or (f"within ${budget:g}" if budget else "no budget set")
    _progress(f"check budget: {verdict}")
    _progress("check quota: not checked (it reads the workspace's usage API; a dry run sends nothing)")


def _train(args: argparse.Namespace) -> int:
    from shared.backends.interface import JobRequest

    overrides = _overrides(args.set)
    prepared = Path(args.prepared).resolve()
    backend = _local_backend()
    request = JobRequest(args.job, str(prepared), prepared.name or "chat", overrides)
    status = backend.submit(request, restart=True)
    _progress(f"job {status.job_name}: {status.status} (log: {backend.job_log(status.job_name)})")
    if args.wait:
        from shared.backends.local.jobs import progress_line

        last, shown = status.status, None
        while not status.status.is_terminal:
            time.sleep(1)
            status = backend.job_status(args.job)
            if status.status != last:
                _progress(f"job {args.job}: {status.status}")
                last = status.status
            progress = backend.job_progress(args.job)
            if progress and progress != shown:
                _progress(f"job {args.job}: {progress_line(progress)}")
                shown = progress
    completed = status.status == JobStatus.COMPLETED
    _emit({"job": status.job_name, "status": status.status, "reason": status.reason,
           "metrics": backend.job_metrics(status.job_name) if completed else None})  # fmt: skip
    return 1 if args.wait and not completed else 0


def _jobs(args: argparse.Namespace) -> int:
    backend = _local_backend()
    names = [args.name] if args.name else backend.job_names()
    _emit([{**asdict(backend.job_status(name)), "metrics": backend.job_metrics(name) or None} for name in names])
    return 0


def _register(args: argparse.Namespace) -> int:
    model = _local_backend().register(args.job)
    _emit({"model": model.name, "version": model.version})
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from shared.backends.interface import ModelRef

    name, _, version = args.model.rpartition(":")
    deployment = args.deployment or re.sub(r"[^A-Za-z0-9]+", "-", f"v{version}-{name}")[:32].strip("-")
    backend = _local_backend()
    backend.deploy(ModelRef(name, version), args.endpoint, deployment, {MANAGED_BY_TAG: MANAGED_BY})
    _progress(f"endpoint {args.endpoint}: starting deployment {deployment}, loading {name}:{version}")
    backend.wait_ready(args.endpoint, deployment)
    backend.set_traffic(args.endpoint, {deployment: 100})
    endpoint = backend.endpoint(args.endpoint)
    _emit({"endpoint": endpoint.name, "deployment": deployment, "scoring_uri": endpoint.scoring_uri})
    return 0


def _keys(args: argparse.Namespace) -> int:
    _emit(_local_backend().keys(args.endpoint))
    return 0


def _invoke(args: argparse.Namespace) -> int:
    if args.message is not None:
        body: Any = {"input_data": {"input_string": [{"role": "user", "content": args.message}],
                                    "parameters": {"max_new_tokens": args.max_new_tokens}}}  # fmt: skip
    else:
        try:
            body = json.loads(Path(args.file).read_text())
        except json.JSONDecodeError as error:
            raise CliError(f"{args.file}: not valid JSON: {error}") from None
    _emit(_local_backend().invoke(args.endpoint, body, args.deployment))
    return 0


def _sample(args: argparse.Namespace) -> int:
    """Write a generated ultrachat-shaped dataset (the demo's), to try `prepare` and uploads on."""
    from shared.datasets.sample import write_sample

    if args.rows < 1:
        raise CliError(f"--rows {args.rows}: expected at least 1")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_sample(out, args.rows, seed=args.seed)
    _emit({"out": str(out), "rows": args.rows})
    return 0


def _endpoints(args: argparse.Namespace) -> int:
    _emit([asdict(endpoint) for endpoint in _local_backend().list_endpoints()])
    return 0


def _delete_endpoint(args: argparse.Namespace) -> int:
    _emit({"endpoint": args.endpoint, "deleted": _local_backend().delete_endpoint(args.endpoint)})
    return 0


def _host(args: argparse.Namespace) -> int:
    from shared.dev.localhost import run_host

    return run_host(start_azurite=args.azurite)


def _demo(args: argparse.Namespace) -> int:
    from shared.dev.demo import run_demo

    return run_demo()


def _named(what: str, rule: Rule) -> Callable[[str], str]:
    """An argument type for a name a user gives: checked here, at the door, once, against the
    rule the backend holds names to (Azure ML's), so no bad name reaches a folder or a service."""

    def parse(value: str) -> str:
        try:
            return str(rule.parse(value))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {value!r}: {rule.expects}") from None

    return parse


def _model(value: str) -> str:
    """NAME:VERSION, each checked."""
    name, colon, version = value.rpartition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"model {value!r}: expected NAME:VERSION")
    return f"{_named('model name', MODEL_NAME)(name)}:{_named('model version', MODEL_VERSION)(version)}"


def _run(value: str) -> str:
    if not is_run_id(value):
        raise argparse.ArgumentTypeError(f"run id {value!r}: expected one as `status` lists them (a-z, 0-9, -)")
    return value


_JOB, _ENDPOINT, _DEPLOYMENT = (
    _named("job name", JOB_NAME),
    _named("endpoint", RESOURCE_NAME),
    _named("deployment", RESOURCE_NAME),
)


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
    status.add_argument("run", nargs="?", type=_run, help="a run id")
    status.add_argument("--state", help="only runs in this state")
    status.add_argument("--limit", type=int, default=20)
    status.set_defaults(handler=_status)

    migrate = commands.add_parser(
        "migrate-ledger", help="move runs recorded by a version before 2026-11 into the indexed layout (idempotent)"
    )
    migrate.set_defaults(handler=_migrate_ledger)

    prepare = commands.add_parser("prepare", help="validate and split a dataset file into DIR")
    prepare.add_argument(
        "input", help="a chat dataset: .jsonl, .jsonl.gz, .parquet, .csv, .tsv, or a .hfdataset.json reference"
    )
    prepare.add_argument("--out", required=True, help="folder for train_sft.jsonl, test_sft.jsonl, report.json")
    prepare.add_argument("--map", action="append", metavar="FIELD=COLUMN",
                         help="read our FIELD (user, assistant, system, messages, conversations, instruction, input, "
                              "output, prompt, completion, prompt_id) from the file's COLUMN; repeatable")  # fmt: skip
    prepare.add_argument("--test-pc", help="percentage of conversations held out for test (default 5)")
    prepare.add_argument("--sample-pc", help="percentage of conversations to keep at all (default 100)")
    prepare.add_argument("--tokenizer", help="count tokens exactly with this tokenizer: a folder, or a Hugging Face "
                                             "id already in the local cache (never downloaded)")  # fmt: skip
    prepare.set_defaults(handler=_prepare)

    submit = commands.add_parser("submit", help="submit prepared data to the configured backend")
    submit.add_argument("--prepared", required=True, help="a folder written by 'prepare', or a storage URI")
    submit.add_argument("--backend", choices=tuple(BACKENDS), help="instead of ML_BACKEND")
    submit.add_argument("--job", type=_JOB, help="the job's name (default: ft-<folder name>)")
    submit.add_argument("--set", action="append", metavar="KEY=VALUE", help="a training parameter, repeatable")
    submit.add_argument("--dry-run", action="store_true", help="print the Azure ML job body; send nothing")
    submit.add_argument("--vm-size", help="with --dry-run: the cluster's VM size, for the estimate")
    submit.add_argument("--region", help="with --dry-run: the workspace's region, for prices from the API")
    submit.set_defaults(handler=_submit)

    train = commands.add_parser("train", help="start (or resume) a local fine-tune job")
    train.add_argument("--prepared", required=True, help="a folder written by 'prepare'")
    train.add_argument("--job", type=_JOB, required=True, help="the job's name; the same name resumes it")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="a training parameter, repeatable")
    train.add_argument("--wait", action="store_true", help="wait for the end; exit 0 only if it Completed")
    train.set_defaults(handler=_train)

    jobs = commands.add_parser("jobs", help="status of local jobs")
    jobs.add_argument("name", nargs="?", type=_JOB)
    jobs.set_defaults(handler=_jobs)

    register = commands.add_parser("register", help="register a completed job's model")
    register.add_argument("--job", type=_JOB, required=True)
    register.set_defaults(handler=_register)

    deploy = commands.add_parser("deploy", help="serve a registered model at a local endpoint, with all its traffic")
    deploy.add_argument("--model", type=_model, required=True, metavar="NAME:VERSION")
    deploy.add_argument("--endpoint", type=_ENDPOINT, required=True)
    deploy.add_argument(
        "--deployment", type=_DEPLOYMENT, help="the deployment's name (default: v<VERSION>-<NAME>, shortened)"
    )
    deploy.set_defaults(handler=_deploy)

    roll_back = commands.add_parser("rollback", help="route an endpoint's traffic back to its previous deployment")
    roll_back.add_argument("endpoint", type=_ENDPOINT)
    roll_back.set_defaults(handler=_rollback)

    keys = commands.add_parser("keys", help="an endpoint's keys (the only place they are shown)")
    keys.add_argument("endpoint", type=_ENDPOINT)
    keys.set_defaults(handler=_keys)

    invoke = commands.add_parser("invoke", help="send a message, or a request file, to an endpoint")
    invoke.add_argument("--endpoint", type=_ENDPOINT, required=True)
    invoke.add_argument("--deployment", type=_DEPLOYMENT, help="this deployment, whatever the traffic split")
    body = invoke.add_mutually_exclusive_group(required=True)
    body.add_argument("--message", help="one user message, sent in Azure ML's chat shape")
    body.add_argument("--file", metavar="REQUEST.json", help="a whole request body")
    invoke.add_argument("--max-new-tokens", type=int, default=64, help="with --message (default 64)")
    invoke.set_defaults(handler=_invoke)

    sample = commands.add_parser("sample", help="write a generated chat dataset (JSON Lines) to try things on")
    sample.add_argument("out", metavar="OUT.jsonl")
    sample.add_argument("--rows", type=int, default=200, help="conversations to write (default 200)")
    sample.add_argument("--seed", type=int, default=1, help="the generator's seed (default 1)")
    sample.set_defaults(handler=_sample)

    endpoints = commands.add_parser("endpoints", help="local endpoints with their last request times")
    endpoints.set_defaults(handler=_endpoints)

    delete = commands.add_parser("delete-endpoint", help="stop and remove a local endpoint")
    delete.add_argument("endpoint", type=_ENDPOINT)
    delete.set_defaults(handler=_delete_endpoint)

    host = commands.add_parser("host", help="run the function app locally without Core Tools")
    host.add_argument("--azurite", action="store_true", help="also start Azurite (data kept in .local/azurite/)")
    host.set_defaults(handler=_host)

    demo = commands.add_parser("demo", help="run the end-to-end demo on the local backend")
    demo.set_defaults(handler=_demo)
    return parser


def _says_enough(error: Exception) -> bool:
    """Whether the error's own message tells the user what went wrong."""
    from shared.backends.interface import BackendError

    # Only a command that loaded the Azure SDK can have met one of its errors: the rest (prepare,
    # the most common) start without loading it.
    azure = sys.modules.get("azure.core.exceptions")
    return isinstance(error, (CliError, SettingsError, LedgerError, BackendError, OSError)) or (
        azure is not None and isinstance(error, azure.AzureError)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as error:
        if _says_enough(error):
            print(f"error: {error}".replace("\n", " "), file=sys.stderr)
            return 1
        # Anything unforeseen is still one line; -v shows where it came from.
        if args.verbose:
            logging.exception("unexpected failure")
        print(f"error: {type(error).__name__}: {error} (run with -v for details)".replace("\n", " "), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
