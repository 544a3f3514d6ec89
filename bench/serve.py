"""Serving latency: `POST /score` on a local endpoint at 1 and 8 concurrent clients, against raw
`model.generate` on the same model in this process, in the same run.

Greedy decoding of a fixed number of tokens, so both do the same work. Goals: p50 at 1 client
within 1.2x of raw generate; no errors at 8 clients.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.backends.local import endpoints  # noqa: E402
from shared.backends.local.scoring import ChatRequest  # noqa: E402
from shared.backends.local.serve import ChatModel  # noqa: E402
from shared.backends.local.settings import TINY_PHI3  # noqa: E402
from shared.backends.local.tiny_model import build_tiny_phi3  # noqa: E402

MESSAGES = [{"role": "user", "content": "Can you explain the water cycle in simple terms?"}]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def model_folder(work: Path) -> Path:
    """The base tiny-phi3 as an MLflow model folder, the form a registered model has."""
    import mlflow.transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_phi3(work / "models" / TINY_PHI3)
    folder = work / "model"
    mlflow.transformers.save_model(
        transformers_model={"model": AutoModelForCausalLM.from_pretrained(base),
                            "tokenizer": AutoTokenizer.from_pretrained(base)},
        path=str(folder), task="llm/v1/chat", pip_requirements=["torch", "transformers"],
    )  # fmt: skip
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    body = {"input_data": {"input_string": MESSAGES, "parameters": {"max_new_tokens": args.new_tokens}}}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        folder = model_folder(work)
        raw_model = ChatModel(folder)
        request = ChatRequest(MESSAGES, max_new_tokens=args.new_tokens)
        raw = []
        for _ in range(args.requests):
            started = time.perf_counter()
            raw_model.generate(request, timeout_s=90)
            raw.append(time.perf_counter() - started)

        endpoints.deploy(work, "bench-serve", ("bench", "1", folder), {}, 90)
        endpoints.wait_ready(work, "bench-serve")

        def call(_: int) -> tuple[float, int]:
            started = time.perf_counter()
            status, _reply = endpoints.invoke(work, "bench-serve", body)
            return time.perf_counter() - started, status

        try:
            results = {}
            for clients in (1, 8):
                started = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    calls = list(pool.map(call, range(args.requests)))
                elapsed = time.perf_counter() - started
                latencies = [seconds for seconds, _ in calls]
                results[f"{clients}_clients"] = {
                    "p50_ms": round(1000 * statistics.median(latencies), 1),
                    "p99_ms": round(1000 * percentile(latencies, 99), 1),
                    "requests_per_s": round(len(calls) / elapsed, 2),
                    "errors": sum(status != 200 for _, status in calls),
                }
        finally:
            endpoints.delete(work, "bench-serve")
    raw_p50 = statistics.median(raw)
    ratio = results["1_clients"]["p50_ms"] / 1000 / raw_p50
    goals = {
        "p50 at 1 client <= 1.2x raw generate": ratio <= 1.2,
        "no errors at 8 clients": results["8_clients"]["errors"] == 0,
    }
    print(json.dumps({
        "raw_generate": {"p50_ms": round(1000 * raw_p50, 1), "p99_ms": round(1000 * percentile(raw, 99), 1)},
        **results,
        "p50_ratio_endpoint_to_raw": round(ratio, 2),
        "goals_met": goals,
        "settings": {"requests": args.requests, "new_tokens": args.new_tokens, "device": raw_model.device},
    }, indent=2))  # fmt: skip
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
