"""Cold start: what `import function_app` costs, against two baselines measured in the same run.

- `import azure.functions`: the worker library alone (every Python function app pays it).
- `import azure.functions` plus the blob binding extension: the floor an SDK-type blob trigger
  sets, since the extension loads azure.storage.blob and azure.identity to build the BlobClient.
  The intake needs that binding so the host never sends a whole upload to the worker; every
  first invocation would load those libraries anyway (storage, ledger, credentials).

Each import runs in a fresh interpreter, alternating, median of N. Goal: the app at most 1.5x the
binding floor (nothing heavy beyond what the binding already loads). The ratio to the bare
library is reported too: it is the price of the SDK-type binding.
Usage: .venv/bin/python bench/cold_start.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL = 1.5
IMPORTS = {
    "azure_functions": "azure.functions",
    "binding_floor": "azure.functions, azurefunctions.extensions.bindings.blob",
    "function_app": "function_app",
}


def import_seconds(modules: str) -> float:
    code = f"import time; t = time.perf_counter(); import {modules}; print(time.perf_counter() - t)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(args.runs):
        for name, modules in IMPORTS.items():
            samples[name].append(import_seconds(modules))
    median = {name: statistics.median(values) for name, values in samples.items()}
    ratio = median["function_app"] / median["binding_floor"]
    print(
        json.dumps(
            {
                **{f"import_{name}_s": round(seconds, 4) for name, seconds in median.items()},
                "ratio_to_azure_functions": round(median["function_app"] / median["azure_functions"], 2),
                "ratio_to_binding_floor": round(ratio, 2),
                "goal": f"ratio_to_binding_floor <= {GOAL}x",
                "met": ratio <= GOAL,
            }
        )
    )
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
