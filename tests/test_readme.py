"""The README's "local backend by hand" commands, run word for word (in a temporary folder, with
this checkout's interpreter) as a new user runs them: each exits 0, none prints a traceback, and
`train --wait` shows its progress."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import stop_local_processes

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _block(after_heading: str, language: str) -> str:
    section = README.split(f"## {after_heading}", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_local_backend_by_hand_works_as_written(tmp_path: Path) -> None:
    commands = [shlex.split(line, comments=True) for line in _block("The local backend by hand", "sh").splitlines()]
    assert commands[0] == ["cli=.venv/bin/python -m shared.cli"]
    request = _block("The local backend by hand", "json")
    (tmp_path / "request.json").write_text(request)
    json.loads(request)  # the README's example body is valid JSON
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOCAL_DATA_DIR": str(tmp_path / ".local"), "ML_BACKEND": "local"}
    env.pop("BASE_MODEL", None)
    outputs = {}
    try:
        for words in (command for command in commands[1:] if command):
            assert words[0] == "$cli", words
            if words[1] == "delete-endpoint":  # before it goes: the README's streaming example
                outputs["openai stream"] = _run_streaming_example(tmp_path, env, words[2])
            result = subprocess.run([sys.executable, "-m", "shared.cli", *words[1:]], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
            said = " ".join(words[1:3])
            assert result.returncode == 0, f"{said}: {result.stderr[-2000:]}"
            assert "Traceback" not in result.stderr, said
            outputs[said] = result
    finally:
        stop_local_processes(tmp_path / ".local")
    assert re.search(r"job my-job: step \d+/\d+, loss [\d.]+, [\d,]+ tokens/s", outputs["train --prepared"].stderr)
    assert json.loads(outputs["register --job"].stdout.splitlines()[-1]) == {"model": "tiny-phi3-prepared",
                                                                             "version": "1"}  # fmt: skip
    assert isinstance(json.loads(outputs["invoke --endpoint"].stdout.splitlines()[-1])["output"], str)
    assert outputs["openai stream"].stdout.strip()
    assert json.loads(outputs["delete-endpoint my-endpoint"].stdout.splitlines()[-1])["deleted"] is True


def _run_streaming_example(folder: Path, env: dict[str, str], endpoint: str) -> subprocess.CompletedProcess[str]:
    """The README's python block, with ENDPOINT_URL and ENDPOINT_KEY found as it says."""
    from shared.backends.local import endpoints

    data_dir = Path(env["LOCAL_DATA_DIR"])
    scoring_uri = endpoints.get(data_dir, endpoint).scoring_uri
    assert scoring_uri is not None
    example = _block("The local backend by hand", "python")
    assert f'model="{endpoint}"' in example
    result = subprocess.run([sys.executable, "-c", example], cwd=folder, capture_output=True, text=True, timeout=120,
                            check=False,
                            env={**env, "ENDPOINT_URL": scoring_uri.removesuffix("/score") + "/v1",
                                 "ENDPOINT_KEY": endpoints.keys(data_dir, endpoint)["primary_key"]})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result
