"""The local backend for real: tiny-phi3 is trained, registered and served on this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shared.backends.interface import BackendError, JobRequest
from shared.backends.local import endpoints
from shared.backends.local.backend import LocalBackend
from shared.backends.local.settings import TINY_PHI3, LocalBackendSettings
from shared.backends.local.tiny_model import END_OF_TURN, build_tiny_phi3
from shared.backends.local.trainer import tokenize_conversations
from shared.datasets.prepare import InputInfo, prepare_dataset
from shared.datasets.sample import write_sample
from shared.datasets.sources import file_chunks
from shared.dev.eventgrid_topic import LocalTopic
from shared.settings import DatasetSettings, load_settings

REPO = Path(__file__).resolve().parent.parent
FAST = {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "num_train_epochs": 2}


@pytest.fixture(scope="module")
def events() -> Iterator[tuple[LocalTopic, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    topic = LocalTopic("topic-key", received.append)
    yield topic, received
    topic.close()


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, events: tuple[LocalTopic, list[Any]]) -> LocalBackend:
    data_dir = tmp_path_factory.mktemp("local-backend")
    settings = load_settings({"LOCAL_DATA_DIR": str(data_dir)})
    local = LocalBackendSettings(data_dir, events[0].endpoint, "topic-key")
    return LocalBackend(replace(settings, backend_settings=local))


def _prepared(directory: Path, rows: int, seed: int) -> Path:
    sample = write_sample(directory / "sample.jsonl", rows, seed=seed)
    with sample.open("rb") as data:
        result = prepare_dataset(file_chunks(data), directory / "prepared", InputInfo(sample.name), DatasetSettings())
    assert result.accepted
    return directory / "prepared"


def _wait(backend: LocalBackend, job: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while not (status := backend.job_status(job)).status.is_terminal:
        assert time.monotonic() < deadline, f"job {job} still {status.status}"
        time.sleep(0.5)
    return status.status


@pytest.fixture(scope="module")
def trained(backend: LocalBackend, tmp_path_factory: pytest.TempPathFactory) -> str:
    prepared = _prepared(tmp_path_factory.mktemp("data"), 100, seed=11)
    backend.submit(
        JobRequest("job-trained", str(prepared), "sample", FAST, {"run_id": "run-1", "dataset_sha256": "abc"})
    )
    assert _wait(backend, "job-trained") == "Completed", (backend.data_dir / "jobs/job-trained/trainer.log").read_text()
    return "job-trained"


def test_tiny_phi3_is_deterministic_and_built_once(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    first, second = build_tiny_phi3(tmp_path / "a"), build_tiny_phi3(tmp_path / "b")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    build_tiny_phi3(first)
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert AutoConfig.from_pretrained(first).model_type == "phi3"
    tokenizer = AutoTokenizer.from_pretrained(first)
    for token in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        tokenize=False,
    )
    assert text == "<|system|>\ns<|end|>\n<|user|>\nu<|end|>\n<|assistant|>\na<|end|>\n<|endoftext|>"


def test_loss_is_on_assistant_tokens_only(backend: LocalBackend, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_phi3(backend.data_dir / "models" / TINY_PHI3))
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is rain?"},
        {"role": "assistant", "content": "Water falling."}, {"role": "user", "content": "And snow?"},
        {"role": "assistant", "content": "Frozen water."},
    ]}  # fmt: skip
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "x", "prompt_id": "y", **conversation}) + "\n")
    ((example,), dropped) = tokenize_conversations(path, tokenizer, 512)
    learned = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100])
    assert learned == f"Water falling.{END_OF_TURN}Frozen water.{END_OF_TURN}"
    assert dropped == 0
    (_, dropped) = tokenize_conversations(path, tokenizer, 8)  # truncation leaves no assistant token
    assert dropped == 1


def test_training_lowers_the_loss_and_records_everything(backend: LocalBackend, trained: str) -> None:
    from mlflow.tracking import MlflowClient

    metrics = backend.job_metrics(trained)
    client = MlflowClient(tracking_uri=backend.tracking_uri)
    points = client.get_metric_history(metrics["mlflow_run_id"], "train_loss")
    per_step: dict[int, float] = {}
    for point in sorted(points, key=lambda m: (m.step, m.timestamp)):
        per_step.setdefault(point.step, point.value)  # the summary comes last, at the last step
    history = [per_step[step] for step in sorted(per_step)]
    assert len(history) == metrics["steps"] > 10
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5 - 0.5  # it learned something
    run = client.get_run(metrics["mlflow_run_id"])
    assert {"eval_loss", "perplexity", "learning_rate", "tokens_per_second"} <= set(run.data.metrics)
    for name in ("train_loss", "tokens_per_second", "eval_loss"):  # the UI's latest is metrics.json's
        assert run.data.metrics[name] == pytest.approx(metrics[name])
    assert run.data.params["lora_r"] == "8"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (backend.data_dir / "mlartifacts").as_uri()
    job_dir = backend.data_dir / "jobs" / trained
    assert (job_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (job_dir / "outputs" / "mlflow_model_folder" / "MLmodel").exists()
    per_epoch = metrics["steps"] // 2
    assert sorted(p.name for p in (job_dir / "checkpoints").iterdir()) == [
        f"checkpoint-{per_epoch}",
        f"checkpoint-{2 * per_epoch}",
    ]  # one per epoch


def test_the_finish_event_is_published_once_with_the_job_and_status(
    trained: str, events: tuple[LocalTopic, list[dict[str, Any]]]
) -> None:
    # The trainer records its status, then publishes: the event may still be on its way.
    deadline = time.monotonic() + 30
    while not any(e["data"]["runId"] == trained for e in events[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    finished = [e for e in events[1] if e["data"]["runId"] == trained]
    assert len(finished) == 1
    (event,) = finished
    assert event["eventType"] == "Microsoft.MachineLearningServices.RunStatusChanged"
    assert event["data"]["runStatus"] == "Completed"
    assert event["data"]["runType"] == "azureml.PipelineRun"
    assert event["data"]["runTags"]["run_id"] == "run-1"
    assert event["subject"].endswith(f"/runs/{trained}")


def test_registering_twice_gives_one_version(backend: LocalBackend, trained: str) -> None:
    from mlflow.tracking import MlflowClient

    results = []
    threads = [threading.Thread(target=lambda: results.append(backend.register(trained))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    model = results[0]
    versions = MlflowClient(tracking_uri=backend.tracking_uri).search_model_versions(f"name = '{model.name}'")
    assert len(versions) == 1
    assert versions[0].tags["job"] == trained and versions[0].tags["dataset_sha256"] == "abc"
    assert versions[0].tags["base_model"] == TINY_PHI3


def test_registering_an_unknown_job_is_refused(backend: LocalBackend) -> None:
    with pytest.raises(BackendError, match="no job 'nope'"):
        backend.register("nope")


@pytest.fixture(scope="module")
def endpoint(backend: LocalBackend, trained: str) -> Iterator[str]:
    model = backend.register(trained)
    backend.deploy(model, "ep-test", "main", {"managed-by": "finetune-on-upload"})
    backend.wait_ready("ep-test", "main")
    backend.set_traffic("ep-test", {"main": 100})
    yield "ep-test"
    backend.delete_endpoint("ep-test")


def _post(url: str, body: bytes, key: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"), timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


CONVERSATION = [{"role": "user", "content": "Can you explain the water cycle in simple terms?"}]


def test_the_endpoint_answers_both_azureml_shapes_and_the_openai_route(backend: LocalBackend, endpoint: str) -> None:
    greedy = {"max_new_tokens": 40}
    flat = {"input_data": {"input_string": CONVERSATION, "parameters": greedy}}
    wrapped = {"input_data": {"input_string": [CONVERSATION], "parameters": greedy}, "params": {}}
    answer = backend.invoke(endpoint, flat)["output"]
    assert answer and backend.invoke(endpoint, wrapped)["output"] == answer
    walkthrough = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 40}
    assert isinstance(backend.invoke(endpoint, {"input_data": {"input_string": [CONVERSATION],
                                                               "parameters": walkthrough}})["output"], str)  # fmt: skip
    base = backend.endpoint(endpoint).scoring_uri.removesuffix("/score")
    body = json.dumps({"messages": CONVERSATION, "max_tokens": 200, "temperature": 0}).encode()  # greedy, as /score
    status, reply = _post(f"{base}/v1/chat/completions", body, backend.keys(endpoint)["secondary_key"])
    assert status == 200
    assert reply["object"] == "chat.completion"
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"  # greedy decoding of the trained model ends its turn
    assert END_OF_TURN not in choice["message"]["content"]
    assert choice["message"]["content"] == answer or choice["message"]["content"].startswith(answer)
    assert reply["usage"]["completion_tokens"] < 200
    assert backend.endpoint(endpoint).last_request_at is not None


@pytest.mark.parametrize(
    ("route", "body", "key", "status", "says"),
    [
        ("/score", b"{}", None, 401, "missing or invalid key"),
        ("/score", b"{}", "wrong-key", 401, "missing or invalid key"),
        ("/score", b"{not json", "primary", 400, "malformed JSON"),
        ("/score", b'{"input_data": {"input_string": "hi"}}', "primary", 400, "non-empty list"),
        ("/v1/chat/completions", b'{"messages": [{"role": "bot", "content": "x"}]}', "primary", 400, "role must be"),
        ("/score", b'{"input_data": {"input_string": [], "parameters": {"top_p": 7}}}', "primary", 400, "non-empty"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "primary",
            400,
            "not valid Unicode",
        ),  # half a surrogate pair: valid JSON, not text
        ("/nowhere", b"{}", "primary", 404, "no route"),
        ("/score", b" " * (1024 * 1024 + 1), "primary", 413, "larger than"),
    ],
)
def test_the_endpoint_refuses_bad_requests_clearly(
    backend: LocalBackend, endpoint: str, route: str, body: bytes, key: str | None, status: int, says: str
) -> None:
    base = backend.endpoint(endpoint).scoring_uri.removesuffix("/score")
    real_key = backend.keys(endpoint)["primary_key"] if key == "primary" else key
    got, reply = _post(base + route, body, real_key)
    assert got == status
    assert says in reply["error"]["message"] and "Traceback" not in reply["error"]["message"]


def test_keys_are_private_and_never_logged(backend: LocalBackend, endpoint: str, trained: str) -> None:
    directory = backend.data_dir / "endpoints" / endpoint
    assert (directory / "keys.json").stat().st_mode & 0o777 == 0o600
    # The job's spec holds the topic key its trainer publishes with: the owner's alone, too.
    assert (backend.data_dir / "jobs" / trained / "job.json").stat().st_mode & 0o777 == 0o600
    holding = [path for path in backend.data_dir.rglob("*") if path.is_file() and b"topic-key" in path.read_bytes()]
    assert holding and all(path.stat().st_mode & 0o777 == 0o600 for path in holding), holding
    keys = backend.keys(endpoint)
    assert keys["primary_key"] != keys["secondary_key"] and len(keys["primary_key"]) >= 32
    log = endpoints.log_path(backend.data_dir, endpoint, "main").read_text()
    log += (backend.data_dir / "gateway" / "gateway.log").read_text()
    assert "Bearer" not in log and keys["primary_key"] not in log and keys["secondary_key"] not in log


def test_endpoint_and_deployment_names_follow_azureml_rules(backend: LocalBackend, trained: str) -> None:
    model = backend.register(trained)
    for bad in ("ab", "1abc", "a" * 33, "ends-", "has_underscore", "new\nline", "../up"):
        with pytest.raises(BackendError, match="3-32 characters"):
            backend.deploy(model, bad, "main", {})
        with pytest.raises(BackendError, match="3-32 characters"):
            backend.deploy(model, "ep-names", bad, {})
    assert not (backend.data_dir / "endpoints" / "ep-names").exists()


def test_a_deleted_endpoint_is_gone_and_frees_its_servers_port(backend: LocalBackend, trained: str) -> None:
    backend.deploy(backend.register(trained), "ep-delete", "main", {})
    backend.wait_ready("ep-delete", "main")
    port = json.loads((backend.data_dir / "endpoints/ep-delete/deployments/main/ready.json").read_text())["port"]
    assert backend.delete_endpoint("ep-delete")
    assert "ep-delete" not in [e.name for e in backend.list_endpoints()]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # nothing listens there any more
    assert not backend.delete_endpoint("ep-delete")


def test_a_killed_trainer_ends_failed_published_and_resumes_from_its_checkpoint(
    backend: LocalBackend, tmp_path: Path, events: tuple[LocalTopic, list[dict[str, Any]]]
) -> None:
    prepared = _prepared(tmp_path, 60, seed=12)
    request = JobRequest("job-killed", str(prepared), "sample", {**FAST, "num_train_epochs": 4}, {"run_id": "run-2"})
    backend.submit(request)
    job_dir = backend.data_dir / "jobs" / "job-killed"
    deadline = time.monotonic() + 240
    while not list((job_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert time.monotonic() < deadline and not backend.job_status("job-killed").status.is_terminal
        time.sleep(0.2)
    pid = json.loads((job_dir / "status.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    while backend.job_status("job-killed").status != "Failed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    failed = backend.job_status("job-killed")
    assert "ended without reporting a result" in (failed.reason or "")
    published = [e["data"]["runStatus"] for e in events[1] if e["data"]["runId"] == "job-killed"]
    assert published == ["Failed"]
    with pytest.raises(BackendError, match="only a Completed job"):
        backend.register("job-killed")

    assert backend.submit(request).status == "Failed"  # a redelivery does not restart it
    backend.submit(request, restart=True)
    assert _wait(backend, "job-killed") == "Completed"
    metrics = backend.job_metrics("job-killed")
    assert metrics["resumed_from"] and "checkpoint-" in metrics["resumed_from"]
    # The trainer records its status, then posts the event: give the post a moment to arrive.
    while len(published := [e["data"]["runStatus"] for e in events[1] if e["data"]["runId"] == "job-killed"]) < 2:
        assert time.monotonic() < deadline + 240, published
        time.sleep(0.1)
    assert published == ["Failed", "Completed"]


def _cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOCAL_DATA_DIR": str(data_dir), "ML_BACKEND": "local"}
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def test_cli_commands_end_with_one_line_of_json(backend: LocalBackend, trained: str, tmp_path: Path) -> None:
    registered = _cli("register", "--job", trained, data_dir=backend.data_dir)
    assert registered.returncode == 0, registered.stderr
    model = json.loads(registered.stdout.splitlines()[-1])
    assert model == {"model": "tiny-phi3-sample", "version": "1"}
    listed = json.loads(_cli("jobs", trained, data_dir=backend.data_dir).stdout.splitlines()[-1])
    assert listed[0]["status"] == "Completed" and listed[0]["metrics"]["steps"] > 0
    bad = _cli("train", "--prepared", str(tmp_path), "--job", "x", "--set", "lora_rank=4", data_dir=backend.data_dir)
    assert bad.returncode == 1 and "unknown training parameter 'lora_rank'" in bad.stderr
    missing = _cli("train", "--prepared", str(tmp_path), "--job", "x2", data_dir=backend.data_dir)
    assert missing.returncode == 1 and "train_sft.jsonl: no such file" in missing.stderr
    unknown = _cli("deploy", "--model", "nope:1", "--endpoint", "ep-nope", data_dir=backend.data_dir)
    assert unknown.returncode == 1 and unknown.stderr.strip().splitlines() == [
        "error: no model nope:1 in the local registry ('register --job JOB' makes one)"]  # fmt: skip
    assert "Traceback" not in bad.stderr + missing.stderr + unknown.stderr

    deployed = _cli("deploy", "--model", f"{model['model']}:{model['version']}", "--endpoint", "ep-cli",
                    data_dir=backend.data_dir)  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    said = _cli("invoke", "--endpoint", "ep-cli", "--message", "hello there", data_dir=backend.data_dir)
    assert said.returncode == 0, said.stderr
    assert isinstance(json.loads(said.stdout.splitlines()[-1])["output"], str)
    assert _cli("delete-endpoint", "ep-cli", data_dir=backend.data_dir).returncode == 0


def test_an_adapter_only_model_is_served_as_its_base_plus_its_adapter(backend: LocalBackend, tmp_path: Path) -> None:
    """The base weights come back whole from MLflow's adapter-only folder (whose `model/` still
    has the LoRA layers in it), so the answer is the one PEFT gives on the real base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shared.backends.local import served_model

    prepared = _prepared(tmp_path, 30, seed=13)
    parameters = {**FAST, "max_steps": 2, "merge_lora_weights": False}
    backend.submit(JobRequest("job-adapter", str(prepared), "sample", parameters))
    assert _wait(backend, "job-adapter") == "Completed"
    folder = Path(backend.job_metrics("job-adapter")["model_folder"])
    assert served_model.is_adapter(folder)
    loaded = served_model.load(folder)
    base = AutoModelForCausalLM.from_pretrained(backend.data_dir / "models" / TINY_PHI3)
    assert all(torch.equal(weight, base.state_dict()[name]) for name, weight in loaded.model.state_dict().items())
    served_model.add_adapter(loaded, "ep-adapter", folder)
    reference = PeftModel.from_pretrained(base, str(folder / "peft")).eval()
    prompt = loaded.tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]  # fmt: skip
    options = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": loaded.stop_ids}
    with torch.inference_mode():
        expected = reference.generate(input_ids=prompt, **options)
        served = loaded.model.generate(input_ids=prompt, adapter_names=["ep-adapter"], **options)
    assert torch.equal(served, expected)


def test_two_jobs_started_at_once_on_a_fresh_data_folder_both_complete(
    tmp_path: Path, events: tuple[LocalTopic, list[dict[str, Any]]]
) -> None:
    """Neither the tiny model nor the MLflow store exists yet: both are made once, by whichever
    job gets there first (the store's tables once raced: "duplicate column name")."""
    data_dir = tmp_path / "fresh"
    settings = load_settings({"LOCAL_DATA_DIR": str(data_dir)})
    fresh = LocalBackend(replace(settings, backend_settings=LocalBackendSettings(data_dir, events[0].endpoint,
                                                                                 "topic-key")))  # fmt: skip
    prepared = _prepared(tmp_path, 30, seed=17)
    for job in ("job-first-a", "job-first-b"):
        fresh.submit(JobRequest(job, str(prepared), "sample", {**FAST, "max_steps": 2}))
    outcomes = {job: _wait(fresh, job) for job in ("job-first-a", "job-first-b")}
    reasons = {job: fresh.job_status(job).reason for job in outcomes}
    assert outcomes == {"job-first-a": "Completed", "job-first-b": "Completed"}, reasons


def test_packing_fills_rows_without_losing_or_mixing_labels() -> None:
    from shared.backends.local.trainer import Example, pack

    examples = [Example(list(range(n)), [-100] * (n // 2) + list(range(n // 2, n))) for n in (30, 50, 70, 90, 120, 200)]
    rows = pack(examples, max_length=256, seed=1)
    assert all(len(row.input_ids) <= 256 for row in rows) and len(rows) < len(examples)
    assert sorted(len(row.input_ids) for row in rows) != sorted(len(e.input_ids) for e in examples)
    assert sum(len(row.input_ids) for row in rows) == sum(len(e.input_ids) for e in examples)
    for row in rows:
        assert len(row.labels) == len(row.input_ids) == len(row.position_ids or [])
        starts = [i for i, position in enumerate(row.position_ids or []) if position == 0]
        assert starts[0] == 0  # every conversation starts again at position 0
        for start, end in zip(starts, [*starts[1:], len(row.input_ids)], strict=True):
            assert row.input_ids[start:end] == list(range(end - start))  # kept whole and in order
    assert pack(examples, 256, seed=1) == rows  # deterministic


def test_packed_conversations_do_not_attend_to_each_other() -> None:
    """A packed row computes each conversation as if it were alone (as trl's padding-free does)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from shared.backends.local.trainer import Example, _Collator, pack

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    model = Phi3ForCausalLM(config).eval()
    examples = [Example(ids, ids) for ids in ([5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16])]
    rows = pack(examples, max_length=9, seed=0)
    batch = _Collator(pad_id=0)(rows)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for r, row in enumerate(rows):
            starts = [i for i, position in enumerate(row.position_ids or []) if position == 0]
            for start, end in zip(starts, [*starts[1:], len(row.input_ids)], strict=True):
                alone = model(input_ids=torch.tensor([row.input_ids[start:end]])).logits[0]
                torch.testing.assert_close(packed[r, start:end], alone)
                assert row.labels[start] == -100  # nothing predicts a conversation's first token
