"""The README's demo, run as a user runs it: upload to teardown on this machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from shared.settings import STORAGE_SETTING

REPO = Path(__file__).resolve().parent.parent


def test_the_demo_runs_the_whole_flow_and_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "demo"], cwd=REPO, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for state in ("received", "prepared", "submitted", "completed", "registered", "deploying", "deployed", "torn_down"):
        assert f" {state} " in out, state
    assert "answered:" in out and "loss plot: " in out and "loss_curve.png" in out
    assert re.search(r" training +step \d+/\d+, loss [\d.]+, [\d,]+ tokens/s", out), out[:3000]
    assert out.rstrip().endswith("stopped the host and Azurite")
    loss_plot = out.split("loss plot: ", 1)[1].split()[0]
    assert Path(loss_plot).read_bytes()[:4] == b"\x89PNG"
    leftover = subprocess.run(
        ["pgrep", "-f", "shared.backends.local.serve .*demo"], capture_output=True, text=True, check=False
    )
    assert leftover.stdout == ""

    # The demo's closing hint works after it ended: `status` finds the demo's store under .local/.
    run_id = re.search(r"run (\S+) is torn_down; `python -m shared.cli status \1`", out)
    assert run_id, out[-2000:]
    env = {name: value for name, value in os.environ.items() if name != STORAGE_SETTING}
    status = subprocess.run([sys.executable, "-m", "shared.cli", "status", run_id.group(1)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "torn_down"
