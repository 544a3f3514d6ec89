"""Serving: a local endpoint under 1 and 8 concurrent clients, its streaming, and k adapters on one
base, each against a baseline measured in the same run.

- 1 client: p50 latency of `POST /score` within 1.2x of raw `model.generate` in this process.
- 8 clients: requests per second at least 4x the 1-client figure, 0 errors (continuous batching).
- Streaming: time to the first content chunk at most 1.5x the prompt's prefill plus one decoding
  step, both measured on the same model in this process.
- k = 4 adapters on one base: the server's resident memory at most 1.5x that of the same server
  with one adapter (k separate endpoints are k such processes: about kx).

Greedy decoding of a fixed number of tokens, so every request does the same work.
Usage: .venv/bin/python bench/serve.py [--requests 40] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.backends.local import endpoints, served_model  # noqa: E402
from shared.backends.local.settings import TINY_PHI3  # noqa: E402
from shared.backends.local.tiny_model import build_tiny_phi3  # noqa: E402
from shared.dev.adapters import random_adapter_model  # noqa: E402

MESSAGES = [{"role": "user", "content": "Can you explain the water cycle in simple terms?"}]
ADAPTERS = 4


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def raw_generate(folder: Path, new_tokens: int, repeats: int) -> dict[str, float]:
    """Raw `model.generate` of the endpoint's model, and the prefill and decode-step times the
    streaming goal is measured against."""
    import torch

    loaded = served_model.load(folder)
    served_model.add_adapter(loaded, "adapter", folder)
    prompt = loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]  # fmt: skip
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
               "pad_token_id": loaded.tokenizer.pad_token_id}  # fmt: skip
    seconds, prefill, step = [], [], []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            loaded.model.generate(input_ids=prompt, **options)
            seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            output = loaded.model(input_ids=prompt, use_cache=True)
            middle = time.perf_counter()
            loaded.model(input_ids=output.logits[:, -1:].argmax(-1), cache=output.past_key_values, use_cache=True)
            prefill.append(middle - started)
            step.append(time.perf_counter() - middle)
    return {"p50_s": statistics.median(seconds), "p99_s": percentile(seconds, 99),
            "prefill_s": statistics.median(prefill), "step_s": statistics.median(step)}  # fmt: skip


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def server_pid(data: Path) -> int:
    (pid_file,) = data.glob("servers/*/server.pid")
    return int(pid_file.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        base = build_tiny_phi3(work / TINY_PHI3)
        folders = [random_adapter_model(base, work / f"adapter-{n}", seed=n) for n in range(ADAPTERS)]
        raw = raw_generate(folders[0], args.new_tokens, args.requests)
        data = work / "data"
        try:
            scoring_uri = endpoints.serve(data, "bench-0", ("bench", "0", folders[0])).scoring_uri
            assert scoring_uri is not None
            results = measure(data, scoring_uri, args.requests, args.new_tokens)
            time.sleep(1)
            one_adapter = rss_mb(server_pid(data))
            for n in range(1, ADAPTERS):
                endpoints.serve(data, f"bench-{n}", ("bench", str(n), folders[n]))
            measure(data, scoring_uri, 2 * ADAPTERS, args.new_tokens, [f"bench-{n}" for n in range(ADAPTERS)])
            k_adapters = rss_mb(server_pid(data))
        finally:
            for n in range(ADAPTERS):
                endpoints.delete(data, f"bench-{n}")
    one, eight = results["1_clients"], results["8_clients"]
    latency_ratio = one["p50_ms"] / 1000 / raw["p50_s"]
    throughput_ratio = eight["requests_per_s"] / one["requests_per_s"]
    first_chunk_ratio = results["first_chunk_p50_ms"] / 1000 / (raw["prefill_s"] + raw["step_s"])
    memory_ratio = k_adapters / one_adapter
    goals = {
        "p50 at 1 client <= 1.2x raw generate": latency_ratio <= 1.2,
        "requests/s at 8 clients >= 4x 1 client": throughput_ratio >= 4,
        "no errors at 8 clients": eight["errors"] == 0,
        "first chunk <= 1.5x prefill + one step": first_chunk_ratio <= 1.5,
        f"RSS with {ADAPTERS} adapters <= 1.5x one": memory_ratio <= 1.5,
    }
    print(json.dumps({
        "raw_generate": {"p50_ms": round(1000 * raw["p50_s"], 1), "p99_ms": round(1000 * raw["p99_s"], 1),
                         "prefill_ms": round(1000 * raw["prefill_s"], 2), "step_ms": round(1000 * raw["step_s"], 2)},
        **results,
        "rss_mb": {"one_adapter": round(one_adapter), f"{ADAPTERS}_adapters": round(k_adapters),
                   f"{ADAPTERS}_separate_endpoints": round(ADAPTERS * one_adapter)},
        "ratios": {"p50_endpoint_to_raw": round(latency_ratio, 2), "rps_8_to_1": round(throughput_ratio, 2),
                   "first_chunk_to_prefill_plus_step": round(first_chunk_ratio, 2),
                   "rss_k_to_1": round(memory_ratio, 2)},
        "goals_met": goals,
        "settings": {"requests": args.requests, "new_tokens": args.new_tokens, "adapters": ADAPTERS},
    }, indent=2))  # fmt: skip
    return 0 if all(goals.values()) else 1


def measure(data: Path, scoring_uri: str, requests: int, new_tokens: int,
            names: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Latency and throughput at 1 and 8 clients on `/score`, and time to first streamed chunk."""
    names = names or ["bench-0"]
    keys = {name: endpoints.keys(data, name)["primary_key"] for name in names}
    body = {"input_data": {"input_string": MESSAGES, "parameters": {"max_new_tokens": new_tokens}}}
    http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16))

    def call(index: int) -> tuple[float, int]:
        key = keys[names[index % len(names)]]
        started = time.perf_counter()
        status = http.post(scoring_uri, json=body, headers={"Authorization": f"Bearer {key}"}).status_code
        return time.perf_counter() - started, status

    results: dict[str, Any] = {}
    for clients in (1, 8):
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            calls = list(pool.map(call, range(requests)))
        elapsed = time.perf_counter() - started
        latencies = [seconds for seconds, _ in calls]
        results[f"{clients}_clients"] = {
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * percentile(latencies, 99), 1),
            "requests_per_s": round(len(calls) / elapsed, 2),
            "errors": sum(status != 200 for _, status in calls),
        }
    chat = {"model": names[0], "messages": MESSAGES, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    first_chunk = []
    for _ in range(max(5, requests // 4)):
        started = time.perf_counter()
        with http.stream("POST", scoring_uri.removesuffix("/score") + "/v1/chat/completions", json=chat,
                         headers={"Authorization": f"Bearer {keys[names[0]]}"}) as reply:  # fmt: skip
            lines = reply.iter_lines()
            for line in lines:
                if '"content": "' in line and '"content": ""' not in line:
                    first_chunk.append(time.perf_counter() - started)
                    break
            for _line in lines:  # read to the end: the next request starts on a quiet server
                pass
    results["first_chunk_p50_ms"] = round(1000 * statistics.median(first_chunk), 2)
    http.close()
    return results


if __name__ == "__main__":
    sys.exit(main())
