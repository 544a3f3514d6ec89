"""The evaluation gate: whether a new model version may take traffic from the one an endpoint
serves now (or, for an endpoint's first model, whether it beats the base model).

Two checks, both on the run's held-out conversations (`test_sft.jsonl`, never trained on):
- **loss**: the new model's loss may exceed the live model's (or the base model's) by at most
  PROMOTION_MAX_LOSS_INCREASE_PERCENT. Where the backend can compute losses (locally), both models
  are scored on the same conversations; where it cannot (Azure ML), the `eval_loss` each job logged
  is used, each on its own test split, and the verdict says so.
- **generation**: GATE_CONVERSATIONS held-out conversations, cut before their last answer, are sent
  to the new deployment at 0% traffic (the deployment header reaches it) with greedy decoding; each
  must be answered with text within the request timeout, and no fewer may end at a stop token
  than the live deployment's answers to the same conversations (a model that rambles to the token
  limit is worse, whatever its loss)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from shared.backends import smoke
from shared.backends.interface import Backend, Conversation, ModelRef
from shared.ledger import Run
from shared.settings import Settings
from shared.storage import blob_service
from shared.vocabulary import PREPARED_CONTAINER, TEST_FILE

GENERATION = {"do_sample": False, "max_new_tokens": 200}  # greedy: the same answer every time
LOSS_CONVERSATIONS = 200  # the loss is estimated on the first ones: enough to rank, bounded in time


@dataclass(frozen=True)
class Answers:
    """How one deployment answered the held-out conversations."""

    deployment: str
    asked: int
    answered: int  # with text, a 2xx status, within the request timeout
    stopped: int | None  # of those, ended at a stop token (None: no tokenizer here to tell)
    problems: list[str] = field(default_factory=list)  # the first few failures, for the record


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reason: str  # one line either way
    numbers: dict[str, Any]  # what the ledger and the status show


def model_of(run: Run) -> ModelRef:
    return ModelRef(run.model_name or "", run.model_version or "")


def logged_eval_loss(run: Run) -> float | None:
    loss = (run.details.get("metrics") or {}).get("eval_loss")
    return float(loss) if loss is not None else None


@contextmanager
def test_conversations(settings: Settings, run: Run, limit: int) -> Iterator[Path]:
    """The first `limit` conversations of the run's `test_sft.jsonl`, in a file of their own."""
    blob = blob_service(settings.storage).get_blob_client(PREPARED_CONTAINER, f"{run.run_id}/{TEST_FILE}")
    with tempfile.TemporaryDirectory(prefix="gate-") as folder:
        path = Path(folder) / TEST_FILE
        with path.open("wb") as out:
            kept, pending = 0, b""
            for chunk in blob.download_blob().chunks():
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines[: limit - kept]:
                    out.write(line + b"\n")
                kept = min(limit, kept + len(lines))
                if kept >= limit:
                    break
            if pending and kept < limit:
                out.write(pending + b"\n")
        yield path


def prompts(test_file: Path, count: int) -> list[Conversation]:
    """Held-out conversations cut before their last assistant turn, so there is something to answer."""
    found = []
    with test_file.open("rb") as lines:
        for line in lines:
            messages: Conversation = json.loads(line)["messages"]
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last_user is not None:
                found.append(messages[: last_user + 1])
            if len(found) == count:
                break
    return found


def ask(backend: Backend, endpoint: str, deployment: str, conversations: list[Conversation], tokenizer: Any) -> Answers:
    answered, stopped, problems = 0, 0, []
    for conversation in conversations:
        last = smoke.run(partial(backend.score, endpoint, deployment), conversation, GENERATION)[-1]
        text = last.text
        if not text or not text.strip():
            problems.append(
                f"{last.status or 'no answer'} {last.excerpt}".strip() if text is None else "an empty answer"
            )
            continue
        answered += 1
        if (
            tokenizer is not None
            and len(tokenizer(text, add_special_tokens=False)["input_ids"]) < GENERATION["max_new_tokens"]
        ):
            stopped += 1
    return Answers(deployment, len(conversations), answered, stopped if tokenizer is not None else None, problems[:3])


def evaluate(settings: Settings, backend: Backend, run: Run, live: Run | None) -> GateVerdict:
    """The gate's verdict on `run`'s deployment (at 0% traffic), against `live` (the run whose
    deployment serves the endpoint now) or, when nothing serves, the base model."""
    rules = settings.rollout
    live_deployment = live.deployment_name if live else None
    endpoint, deployment = run.endpoint_name or "", run.deployment_name or ""
    with test_conversations(settings, run, max(LOSS_CONVERSATIONS, rules.gate_conversations)) as test_file:
        computed = backend.held_out_losses([model_of(run), model_of(live) if live else None], str(test_file))
        candidate_loss: float | None
        baseline_loss: float | None
        if computed is not None:
            candidate_loss, baseline_loss = computed
            how = f"each model on the first {LOSS_CONVERSATIONS} conversations of this run's {TEST_FILE}"
        else:
            candidate_loss, baseline_loss = logged_eval_loss(run), logged_eval_loss(live) if live else None
            how = "eval_loss logged by each job, each on its own test split"
        conversations = prompts(test_file, rules.gate_conversations)
    tokenizer = backend.tokenizer()
    new = ask(backend, endpoint, deployment, conversations, tokenizer)
    old = ask(backend, endpoint, live_deployment, conversations, tokenizer) if live_deployment else None
    against = f"the live deployment {live_deployment}" if live_deployment else "the base model"
    numbers: dict[str, Any] = {
        "rule": f"loss at most {rules.max_loss_increase_percent:g}% above {against}'s; every held-out "
        "conversation answered; no fewer answers ending at a stop token than the live deployment",
        "compared_with": live_deployment or "base model",
        "loss": {"candidate": candidate_loss, "baseline": baseline_loss, "how": how},
        "generation": {"candidate": asdict(new), "live": asdict(old) if old else None},
    }
    reasons = []
    if candidate_loss is not None and baseline_loss is not None:
        limit = baseline_loss * (1 + rules.max_loss_increase_percent / 100)
        numbers["loss"]["limit"] = limit
        if candidate_loss > limit:
            change = (candidate_loss / baseline_loss - 1) * 100 if baseline_loss else float("inf")
            reasons.append(f"held-out loss {candidate_loss:.4f} is {change:+.1f}% against {against}'s "
                           f"{baseline_loss:.4f} (at most {rules.max_loss_increase_percent:g}% allowed)")  # fmt: skip
    else:
        numbers["loss"]["note"] = "no loss to compare with: the loss check was skipped"
    if new.answered < new.asked:
        reasons.append(f"{new.asked - new.answered} of {new.asked} held-out conversations got no answer "
                       f"({'; '.join(new.problems)})")  # fmt: skip
    elif old and new.stopped is not None and old.stopped is not None and new.stopped < old.stopped:
        reasons.append(f"{new.stopped} of {new.asked} answers end at a stop token, against {old.stopped} "
                       f"from {live_deployment}")  # fmt: skip
    if reasons:
        return GateVerdict(False, "; ".join(reasons), numbers)
    loss = (
        f"loss {candidate_loss:.4f} vs {baseline_loss:.4f}"
        if candidate_loss is not None and baseline_loss is not None
        else "no loss to compare"
    )
    stops = f", {new.stopped}/{new.asked} ended at a stop token" if new.stopped is not None else ""
    return GateVerdict(
        True, f"gate passed against {against}: {loss}; {new.answered}/{new.asked} answered{stops}", numbers
    )
