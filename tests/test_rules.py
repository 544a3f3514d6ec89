"""The rules, as pure functions, with no storage, service or model behind them: the janitor's idle
rule, endpoint naming, job-event parsing, parameter merging, the /score request shapes and the
registry model's facts. Each runs in milliseconds."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.backends.azureml.component import ComponentInputError, merge_parameters
from shared.backends.azureml.registry_model import RegistryModel
from shared.backends.interface import Endpoint
from shared.backends.local.jobs import progress_line
from shared.backends.registry import plugin
from shared.backends.smoke import REQUEST_SHAPES, reply_text, run
from shared.deployment import deployment_name_for, endpoint_name_for
from shared.events import ignore_reason, parse_job_event
from shared.janitor import judge
from shared.ledger import Run, RunState, Upload
from shared.settings import JanitorSettings, load_settings
from shared.training import ParameterError, parse_parameter
from shared.vocabulary import MANAGED_BY, PIPELINE_RUN_TYPE, RUN_COMPLETED, RUN_STATUS_CHANGED, JobStatus

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
RULES = JanitorSettings(idle_minutes=60, min_age_minutes=30)


def _endpoint(created_minutes_ago: float, last_request_minutes_ago: float | None, **tags: str) -> Endpoint:
    def at(minutes: float) -> str:
        return (NOW - timedelta(minutes=minutes)).isoformat()

    last = None if last_request_minutes_ago is None else at(last_request_minutes_ago)
    return Endpoint("ep", "Succeeded", None, None, at(created_minutes_ago), last, {"managed-by": MANAGED_BY, **tags})


@pytest.mark.parametrize(
    ("endpoint", "deleted", "says"),
    [
        (_endpoint(600, 61), True, "61.0 min idle, window 60 min"),
        (_endpoint(600, None), True, "no request since creation"),
        (_endpoint(600, 59), False, "59.0 min ago"),
        (_endpoint(20, None), False, "younger than 30 min"),
        (_endpoint(600, None, keep="true"), False, "tagged keep"),
        (_endpoint(600, None, keep="false"), True, "no request since creation"),
        (Endpoint("theirs", "Succeeded", None, None, NOW.isoformat(), None, {}), False, "not managed by this app"),
    ],
)
def test_the_janitors_idle_rule(endpoint: Endpoint, deleted: bool, says: str) -> None:
    verdict = judge(endpoint, RULES, NOW)
    assert verdict.delete is deleted and says in verdict.evidence


def _run(blob_name: str, version: str = "v1", **report: Any) -> Run:
    upload = Upload("datasets", blob_name, version)
    return Run(upload.run_id, RunState.REGISTERED, upload, NOW, NOW, {}, details={"report": report})


@pytest.mark.parametrize(
    "blob", ["chats.jsonl", "a" * 80 + ".jsonl", "1-digits-first.jsonl", "team/x/support bot.v2.jsonl"]
)
def test_endpoint_names_are_valid_azure_ml_names_one_per_dataset(blob: str) -> None:
    settings = load_settings({})
    name = endpoint_name_for(settings, _run(blob))
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]", name)
    assert endpoint_name_for(settings, _run(blob, "v2")) == name  # a later upload of the same dataset
    assert endpoint_name_for(settings, _run(f"other/{blob}")) != name  # another folder, another dataset
    other_account = load_settings({"AzureWebJobsStorage": "AccountName=someoneelse;AccountKey=a2V5"})
    assert endpoint_name_for(other_account, _run(blob)) != name  # names are unique per Azure region
    by_key = load_settings({"AzureWebJobsStorage": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5"})
    by_identity = load_settings({"AzureWebJobsStorage__accountName": "acct"})
    assert endpoint_name_for(by_key, _run(blob)) == endpoint_name_for(by_identity, _run(blob))  # same account
    assert endpoint_name_for(settings, _run(blob, endpoint="support-bot")) == "support-bot"


def test_deployment_names_are_valid_and_one_per_run() -> None:
    first, second = _run("chats.jsonl"), _run("chats.jsonl", "v2")
    assert re.fullmatch(r"run-[0-9a-f]{12}", deployment_name_for(first))
    assert deployment_name_for(first) != deployment_name_for(second)


def test_job_events_in_both_key_casings_and_either_success_type() -> None:
    pascal = parse_job_event(RUN_STATUS_CHANGED.lower(), {"RunId": "ft-x", "RunStatus": "failed", "RunType": None})
    assert pascal is not None and pascal.status == JobStatus.FAILED and pascal.run_type == ""
    completed = parse_job_event(RUN_COMPLETED, {"runId": "ft-x", "runType": None, "runTags": {}})
    assert completed is not None and completed.status == JobStatus.COMPLETED
    assert parse_job_event("Microsoft.Storage.BlobCreated", {"runId": "ft-x"}) is None
    assert parse_job_event(RUN_COMPLETED, {"experimentName": "no run id"}) is None
    with_reason = parse_job_event(
        RUN_STATUS_CHANGED, {"runId": "x", "runStatus": "Failed", "error": {"message": "OOM"}}
    )
    assert with_reason is not None and with_reason.reason == "OOM"


@pytest.mark.parametrize(
    ("data", "topic", "ignored_for"),
    [
        ({"runId": "j", "runStatus": "Completed", "runType": "azureml.PipelineRun"}, "T", None),
        ({"runId": "j", "runStatus": "Completed"}, "t", None),  # topics compare case-insensitively
        ({"runId": "j", "runStatus": "Completed", "runType": "azureml.StepRun"}, "T", "run type 'azureml.StepRun'"),
        ({"runId": "j", "runStatus": "Running"}, "T", "status Running is not final"),
        ({"runId": "j", "runStatus": "Exploded"}, "T", "status Exploded is not final"),
        ({"runId": "j", "runStatus": "Failed"}, "other", "topic 'other' is not one of JOB_EVENTS_TOPICS"),
    ],
)
def test_which_job_events_are_acted_on(data: dict[str, Any], topic: str, ignored_for: str | None) -> None:
    event = parse_job_event(RUN_STATUS_CHANGED, data)
    assert event is not None
    reason = ignore_reason(event, topic, ("T",), (PIPELINE_RUN_TYPE,))
    assert reason == ignored_for if ignored_for is None else ignored_for in (reason or "")


def test_a_backend_that_names_no_run_type_takes_any_and_the_job_name_decides() -> None:
    """The fine-tuning job's runType is documented nowhere: the azureml-finetune backend names none."""
    for run_type in ("azureml.FineTuning", "azureml.PipelineRun", None):
        event = parse_job_event(RUN_STATUS_CHANGED, {"runId": "j", "runStatus": "Completed", "runType": run_type})
        assert event is not None and ignore_reason(event, "T", ("T",), ()) is None
    assert plugin("azureml-finetune").job_run_types == ()
    assert plugin("azureml").job_run_types == plugin("local").job_run_types == (PIPELINE_RUN_TYPE,)


def test_parameters_merge_ours_then_the_models_then_the_uploads() -> None:
    model_tag = str({"num_train_epochs": 1, "precision": 16, "learning_rate_min": 1e-6})
    merged, warnings = merge_parameters(model_tag, {"num_train_epochs": 2, "apply_lora": True})
    assert merged["num_train_epochs"] == 2 and merged["precision"] == "16" and merged["apply_lora"] == "true"
    assert merged["lr_scheduler_type"] == "cosine"  # ours (the walkthrough's)
    assert "learning_rate_min" not in merged and any("learning_rate_min" in w for w in warnings)
    with pytest.raises(ComponentInputError, match="'packing' is not an input"):
        merge_parameters(None, {"packing": True})
    assert parse_parameter("lora_r", " 16 ") == 16
    with pytest.raises(ParameterError, match="lora_r='zero': expected a whole number"):
        parse_parameter("lora_r", "zero")


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        ({"output": "hi", "finish_reason": "stop"}, "hi"),
        ({"output": ["hi"]}, "hi"),
        ({"output": None, "error": {"status_code": 400}}, None),
        ([{"0": "hi"}], "hi"),
        ({"choices": [{"message": {"role": "assistant", "content": "hi"}}]}, "hi"),
        ({"choices": [{"message": {"content": None}}]}, None),
        ({"choices": [{"text": "hi"}]}, "hi"),
        (["hi"], "hi"),
        ("hi", "hi"),
        ({"unexpected": 1}, None),
        ([], None),
    ],
)
def test_every_documented_answer_shape_is_read(reply: Any, text: str | None) -> None:
    assert reply_text(reply) == text


def test_a_request_is_tried_in_each_shape_until_one_is_answered() -> None:
    sent: list[dict[str, Any]] = []

    def refuses_the_flat_shape(body: dict[str, Any]) -> tuple[int | None, str]:
        sent.append(body)
        nested = isinstance(body["input_data"]["input_string"][0], list)
        return (200, json.dumps([{"0": "hello"}])) if nested else (400, json.dumps({"error": "bad input"}))

    conversation, greedy = [{"role": "user", "content": "hi"}], {"do_sample": False}
    attempts = run(refuses_the_flat_shape, conversation, greedy)
    assert [(a.status, a.answered) for a in attempts] == [(400, False), (200, True)]
    assert [body for body in sent] == [build(conversation, greedy) for _, build in REQUEST_SHAPES]
    assert [body["input_data"]["parameters"] for body in sent] == [greedy, greedy]
    unreachable = run(lambda body: (None, "ConnectionError: refused"), conversation, greedy)
    assert [a.status for a in unreachable] == [None, None] and not unreachable[-1].answered
    assert unreachable[-1].excerpt == "ConnectionError: refused"
    assert not run(lambda body: (200, "not json"), conversation, greedy)[-1].answered


def test_training_progress_reads_as_one_line() -> None:
    progress = {"step": 12, "total_steps": 40, "loss": 5.1234, "tokens_per_second": 3612.4, "eta_s": 8.2}
    assert progress_line(progress) == "step 12/40, loss 5.123, 3,612 tokens/s, about 8 s left"
    assert progress_line({**progress, "eta_s": None}) == "step 12/40, loss 5.123, 3,612 tokens/s"


def _registry_body(properties: dict[str, Any]) -> dict[str, Any]:
    return {"id": "azureml://registries/azureml/models/Phi-4/versions/8", "name": "8", "properties": properties}


def test_registry_model_facts_come_from_system_metadata_first_then_the_old_tags() -> None:
    both = RegistryModel.from_rest(_registry_body({
        "tags": {"finetune_compute_allow_list": "['Standard_NC24ads_A100_v4']"},
        "system_metadata": {"supportedComputes": {"finetuneComputes": ["Standard_NC40ads_H100_v5"]}},
    }))  # fmt: skip
    assert both.allowed_computes("finetune") == (
        ["Standard_NC40ads_H100_v5"], "system metadata supportedComputes.finetuneComputes")  # fmt: skip
    tags_only = RegistryModel.from_rest(_registry_body({"tags": {"inference_compute_allow_list": "['A', 'B']"}}))
    assert tags_only.allowed_computes("inference") == (["A", "B"], "tag inference_compute_allow_list")
    assert tags_only.allowed_computes("finetune")[0] is None
    archived = RegistryModel.from_rest(_registry_body({"isArchived": True}))
    assert archived.archived and archived.label == "Phi-4:8"
    retired = RegistryModel.from_rest(_registry_body({"systemMetadata": json.dumps(
        {"deprecation": {"finetuneRetirementDate": "2025-08-30T00:00:00.000000Z"}})}))  # fmt: skip
    assert retired.finetune_retirement() == "2025-08-30"
