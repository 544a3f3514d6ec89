"""Every name a user gives is checked once, at the door, against the rule the backend holds
names to, and a bad one is refused in one line before it reaches a folder or a service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.backends.local.jobs import JobError, check_job_name

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "--prepared", "data", "--job", "nightly\nrun"], r"job name 'nightly\nrun'"),
        (["submit", "--prepared", "data", "--job", "a\tb"], r"job name 'a\tb'"),
        (["jobs", "../elsewhere"], "job name '../elsewhere'"),
        (["register", "--job", "with space"], "job name 'with space'"),
        (["deploy", "--model", "../../etc/passwd:1", "--endpoint", "chat"], "model name '../../etc/passwd'"),
        (["deploy", "--model", "chat:1/2", "--endpoint", "chat"], "model version '1/2'"),
        (["deploy", "--model", "chat", "--endpoint", "chat"], "model 'chat': expected NAME:VERSION"),
        (["deploy", "--model", "chat:1", "--endpoint", "chat\r\n"], r"endpoint 'chat\r\n'"),
        (
            ["deploy", "--model", "chat:1", "--endpoint", "chat", "--deployment", "blue/green"],
            "deployment 'blue/green'",
        ),
        (["invoke", "--endpoint", "a#b", "--message", "hi"], "endpoint 'a#b'"),
        (["keys", "ab"], "endpoint 'ab': 3-32 characters"),
        (["rollback", "x" * 40], "endpoint 'xxxx"),
        (["delete-endpoint", "chat-"], "endpoint 'chat-'"),
        (["status", "it's-0123456789ab"], 'run id "it\'s-0123456789ab"'),
    ],
)
def test_a_bad_name_is_refused_at_the_door_in_one_line(args: list[str], says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1, done.stdout
    assert says in done.stderr.strip().splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr and not done.stdout


@pytest.mark.parametrize("name", ["run\n", "a/b", "..", "", "x" * 256, "-lead"])
def test_the_local_backend_makes_no_folder_of_a_bad_job_name(name: str) -> None:
    with pytest.raises(JobError, match="job name"):
        check_job_name(name)
