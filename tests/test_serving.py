"""Local endpoints as chat clients use them: the real `openai` package against a real server
process holding tiny-phi3 and two LoRA adapters on it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared.backends.local import endpoints
from shared.backends.local.settings import TINY_PHI3
from shared.backends.local.tiny_model import build_tiny_phi3
from shared.dev.adapters import random_adapter_model
from tests.conftest import stop_local_processes

HELLO = [{"role": "user", "content": "hello there"}]
PROMPTS = ["hello there", "Can you explain the water cycle in simple terms?", "hi", "What is the capital of France?"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import mlflow.transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = tmp_path_factory.mktemp("models")
    base = build_tiny_phi3(work / TINY_PHI3)
    merged = work / "merged"
    mlflow.transformers.save_model(
        transformers_model={"model": AutoModelForCausalLM.from_pretrained(base),
                            "tokenizer": AutoTokenizer.from_pretrained(base)},
        path=str(merged), task="llm/v1/chat", pip_requirements=["torch", "transformers"],
    )  # fmt: skip
    return {
        "base": base,
        "merged": merged,
        "one": random_adapter_model(base, work / "adapter-one", seed=1),
        "two": random_adapter_model(base, work / "adapter-two", seed=2),
    }


@pytest.fixture(scope="module")
def data_dir(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    data = tmp_path_factory.mktemp("serving")
    endpoints.serve(data, "ep-one", ("one", "1", models["one"]), 60)
    endpoints.serve(data, "ep-two", ("two", "1", models["two"]), 60)
    yield data
    stop_local_processes(data)


def client(data: Path, name: str, key: str | None = None) -> openai.OpenAI:
    base_url = endpoints.get(data, name).scoring_uri.removesuffix("/score") + "/v1"  # type: ignore[union-attr]
    return openai.OpenAI(base_url=base_url, api_key=key or endpoints.keys(data, name)["primary_key"], max_retries=0)


def greedy(data: Path, name: str, content: str, max_tokens: int = 16, **extra: Any) -> Any:
    messages = [{"role": "user", "content": content}]
    return client(data, name).chat.completions.create(
        model=name, messages=messages, max_tokens=max_tokens, temperature=0, **extra
    )


def test_two_adapters_share_one_process_and_answer_as_their_own_model(data_dir: Path, models: dict[str, Path]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    one, two = endpoints.get(data_dir, "ep-one"), endpoints.get(data_dir, "ep-two")
    assert one.scoring_uri == two.scoring_uri  # one gateway, one port: the key picks the endpoint
    assert len(list((data_dir / "servers").iterdir())) == 1
    answers = {
        name: greedy(data_dir, name, "hello there", 12).choices[0].message.content for name in ("ep-one", "ep-two")
    }
    assert answers["ep-one"] != answers["ep-two"]

    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]  # fmt: skip
    for name, adapter in (("ep-one", "one"), ("ep-two", "two")):
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]),
                                              str(models[adapter] / "peft")).eval()  # fmt: skip
        with torch.inference_mode():
            tokens = reference.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
        assert answers[name] == tokenizer.decode(tokens[0, prompt.shape[1] :], skip_special_tokens=True)


def test_streaming_sends_openai_chunks_that_add_up_to_the_answer(data_dir: Path) -> None:
    whole = greedy(data_dir, "ep-one", "hello there", 20)
    stream = greedy(data_dir, "ep-one", "hello there", 20, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    last_choice = [chunk for chunk in chunks if chunk.choices][-1]
    assert last_choice.choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])

    plain = list(greedy(data_dir, "ep-one", "hello there", 5, stream=True))
    assert all(chunk.usage is None and chunk.choices for chunk in plain)
    assert plain[-1].choices[0].finish_reason == "length"


def test_the_stream_is_server_sent_events_ending_in_done(data_dir: Path) -> None:
    url = endpoints.get(data_dir, "ep-two").scoring_uri.removesuffix("/score") + "/v1/chat/completions"  # type: ignore[union-attr]
    key = endpoints.keys(data_dir, "ep-two")["secondary_key"]
    body = {"model": "ep-two", "messages": HELLO, "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_models_lists_the_endpoint_its_key_opens(data_dir: Path) -> None:
    listed = client(data_dir, "ep-two").models.list().data
    assert [model.id for model in listed] == ["ep-two"] and listed[0].object == "model"
    assert client(data_dir, "ep-two").models.retrieve("ep-two").id == "ep-two"
    with pytest.raises(openai.NotFoundError):
        client(data_dir, "ep-two").models.retrieve("ep-one")


@pytest.mark.parametrize(
    ("change", "error", "says"),
    [
        ({"api_key": "not-a-key"}, openai.AuthenticationError, "missing or invalid key"),
        ({"model": "ep-one"}, openai.NotFoundError, "does not exist or you do not have access"),
        ({"n": 2}, openai.BadRequestError, "n must be 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "up to 4 non-empty strings"),
        ({"messages": [{"role": "bot", "content": "x"}]}, openai.BadRequestError, "role must be one of"),
        ({"temperature": 9}, openai.BadRequestError, "temperature must be a number from 0.0 to 2.0"),
        ({"max_completion_tokens": 0}, openai.BadRequestError, "max_completion_tokens must be a number"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            openai.BadRequestError,
            "tools is not supported",
        ),
    ],
)
def test_refusals_are_openai_errors_the_client_shows(
    data_dir: Path, change: dict[str, Any], error: type[openai.APIStatusError], says: str
) -> None:
    request: dict[str, Any] = {"model": "ep-two", "messages": HELLO, "max_tokens": 4, **change}
    with pytest.raises(error) as raised:
        client(data_dir, "ep-two", request.pop("api_key", None)).chat.completions.create(**request)
    body = raised.value.body
    assert isinstance(body, dict) and says in body["message"] and set(body) >= {"message", "type", "code"}


def test_generation_options_are_honoured(data_dir: Path) -> None:
    full = greedy(data_dir, "ep-one", "hello there", 20).choices[0].message.content
    assert full and len(full) > 6
    stop = full[3:6]
    cut = greedy(data_dir, "ep-one", "hello there", 20, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"
    short = client(data_dir, "ep-one").chat.completions.create(
        model="ep-one", messages=HELLO, max_completion_tokens=3, temperature=0
    )
    assert short.usage is not None and short.usage.completion_tokens == 3

    def sampled(seed: int) -> str | None:
        return (
            client(data_dir, "ep-one")
            .chat.completions.create(
                model="ep-one", messages=HELLO, max_tokens=12, temperature=1.3, top_p=0.95, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1


def test_concurrent_requests_get_what_they_would_get_alone(data_dir: Path) -> None:
    jobs = [(name, prompt) for prompt in PROMPTS for name in ("ep-one", "ep-two")] * 2
    alone = {job: greedy(data_dir, *job, max_tokens=24).choices[0].message.content for job in set(jobs)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: greedy(data_dir, *job, max_tokens=24).choices[0].message.content, jobs))
    assert together == [alone[job] for job in jobs]


def test_azureml_score_route_and_deployment_header(data_dir: Path) -> None:
    body = {"input_data": {"input_string": HELLO, "parameters": {"max_new_tokens": 12}}}
    status, reply = endpoints.invoke(data_dir, "ep-one", body)
    assert status == 200 and reply["output"] == greedy(data_dir, "ep-one", "hello there", 12).choices[0].message.content
    url = endpoints.get(data_dir, "ep-one").scoring_uri
    key = endpoints.keys(data_dir, "ep-one")["primary_key"]
    named = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}", "azureml-model-deployment": "main"},  # type: ignore[arg-type]
                       timeout=60)  # fmt: skip
    assert named.status_code == 200 and named.headers["azureml-model-deployment"] == "main"
    wrong = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}", "azureml-model-deployment": "blue"})  # type: ignore[arg-type]
    assert wrong.status_code == 404 and "has no deployment 'blue'" in wrong.json()["error"]["message"]


def test_a_client_that_goes_away_frees_its_slot(data_dir: Path) -> None:
    """Through the gateway: the server behind it sees the client go."""
    url = endpoints.get(data_dir, "ep-one").scoring_uri.removesuffix("/score")  # type: ignore[union-attr]
    key = endpoints.keys(data_dir, "ep-one")["primary_key"]
    port = json.loads((data_dir / "endpoints/ep-one/deployments/main/ready.json").read_text())["port"]
    server = f"http://127.0.0.1:{port}"
    body = {"model": "ep-one", "messages": HELLO, "max_tokens": 2000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as reply:  # fmt: skip
        lines = reply.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        assert httpx.get(f"{server}/health").json()["requests_in_flight"] == 1
    deadline = time.monotonic() + 5
    while httpx.get(f"{server}/health").json()["requests_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server}/health").json()["requests_in_flight"] == 0


def test_adapters_come_and_go_and_the_last_one_takes_the_server(models: dict[str, Path], tmp_path: Path) -> None:
    try:
        endpoints.serve(tmp_path, "ep-first", ("one", "1", models["one"]), 60)
        endpoints.serve(tmp_path, "ep-merged", ("merged", "1", models["merged"]), 60)
        assert len(list((tmp_path / "servers").iterdir())) == 2  # a merged model has a process of its own
        endpoints.serve(tmp_path, "ep-second", ("two", "1", models["two"]), 60, timeout_s=30)
        assert len(list((tmp_path / "servers").iterdir())) == 2  # the adapter joined its base's server
        assert endpoints.delete(tmp_path, "ep-first")
        assert greedy(tmp_path, "ep-second", "hi", 4).choices[0].message.content is not None
        with pytest.raises(endpoints.EndpointError, match="no endpoint"):
            endpoints.get(tmp_path, "ep-first")
        port = int(endpoints.get(tmp_path, "ep-second").scoring_uri.rsplit(":", 1)[1].split("/")[0])  # type: ignore[union-attr]
        assert endpoints.delete(tmp_path, "ep-second") and endpoints.delete(tmp_path, "ep-merged")
        assert list((tmp_path / "servers").iterdir()) == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health")
    finally:
        stop_local_processes(tmp_path)


def test_the_gateway_routes_only_within_the_keys_endpoint(data_dir: Path) -> None:
    url = endpoints.get(data_dir, "ep-one").scoring_uri.removesuffix("/score") + "/v1/chat/completions"  # type: ignore[union-attr]
    key = endpoints.keys(data_dir, "ep-one")["primary_key"]
    body = {"messages": HELLO, "max_tokens": 2}
    for elsewhere in ("../../ep-two/deployments/main", "/main", "main/..", "ep-two"):
        answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}",
                                                      "azureml-model-deployment": elsewhere}, timeout=60)  # fmt: skip
        assert answer.status_code == 404 and "has no deployment" in answer.json()["error"]["message"], elsewhere
    endpoints.set_traffic(data_dir, "ep-one", {})  # nothing takes traffic: a clear 503, not someone else's model
    try:
        answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert answer.status_code == 503 and "no deployment taking traffic" in answer.json()["error"]["message"]
    finally:
        endpoints.set_traffic(data_dir, "ep-one", {"main": 100})
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200


def test_a_gateway_that_died_comes_back_on_its_port(data_dir: Path) -> None:
    import os
    import signal

    from shared.backends.local.processes import pid_alive, running

    before = endpoints.get(data_dir, "ep-two").scoring_uri
    killed = int((data_dir / "gateway" / "gateway.pid").read_text())
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    # Gone once its lock is free: its main thread can show as ended while its other threads still
    # hold its files for a moment.
    while running(data_dir / "gateway", "gateway") and time.monotonic() < deadline:
        time.sleep(0.05)
    # Routing traffic with the gateway down neither waits for it nor starts it (it once took the
    # endpoints' lock twice and hung).
    traffic = json.loads((data_dir / "endpoints" / "ep-two" / "traffic.json").read_text())
    endpoints.set_traffic(data_dir, "ep-two", traffic)
    assert not (data_dir / "gateway" / "gateway.pid").exists() or not pid_alive(
        int((data_dir / "gateway" / "gateway.pid").read_text())
    )
    while (found := endpoints.get(data_dir, "ep-two")).scoring_uri is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first look at an endpoint starts it again
    assert int((data_dir / "gateway" / "gateway.pid").read_text()) != killed
    assert found.scoring_uri == before
    assert greedy(data_dir, "ep-two", "hi", 2).choices[0].message.content is not None
