"""Cold start: `import function_app` time as a ratio to a bare `import azure.functions`.

Both are measured in the same run, each in fresh interpreters, alternating, median of N.
Goal: at most 2x. Usage: .venv/bin/python bench/cold_start.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL = 2.0


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    baseline, app = [], []
    for _ in range(args.runs):
        baseline.append(import_seconds("azure.functions"))
        app.append(import_seconds("function_app"))
    ratio = statistics.median(app) / statistics.median(baseline)
    print(
        json.dumps(
            {
                "import_azure_functions_s": round(statistics.median(baseline), 4),
                "import_function_app_s": round(statistics.median(app), 4),
                "ratio": round(ratio, 2),
                "goal": f"<= {GOAL}x",
                "met": ratio <= GOAL,
            }
        )
    )
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
