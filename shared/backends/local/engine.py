"""Continuous batching for a local endpoint: one thread runs every forward pass, over all the
requests in flight at once. A request joins the batch at the next step (its prompt is prefilled,
then its key/value cache is merged into the batch's), and leaves it when it finishes, runs out of
time or its client goes away, so throughput grows with concurrency instead of queueing behind a
lock. Each request may name a LoRA adapter: rows of one batch can use different adapters of the
same base (PEFT's mixed-adapter batches), which is how one process serves k fine-tunes.

Sequences are left-padded; positions come from each row's own token count, so a row's result does
not depend on what else is in the batch (greedy decoding gives what a batch of one gives)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("engine")
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int | None


@dataclass(frozen=True)
class Step:
    """What one request gets after a step: the text it may show now, and how it ended (once)."""

    text: str
    finish_reason: str | None  # stop, length, timeout, canceled, error
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Generation:
    """One request's work. `deliver` is called from the engine's thread."""

    prompt: list[int]
    adapter: str | None
    max_new_tokens: int
    sampling: Sampling | None  # None: greedy
    stop: tuple[str, ...]
    time_limit_s: float
    deliver: Callable[[Step], object]
    canceled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    work: Generation
    started: float
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    shown: int = 0  # characters of the decoded text already delivered
    pending: int = -1  # the token chosen last, not yet fed to the model


class BatchingEngine:
    def __init__(self, model: Any, tokenizer: Any, stop_ids: list[int], device: str, max_batch: int = 16) -> None:
        self.model, self.tokenizer, self.stop_ids, self.device = model, tokenizer, set(stop_ids), device
        self.max_batch = max_batch
        self.context_length = int(getattr(model.config, "max_position_embeddings", 4096))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: queue.Queue[Generation] = queue.Queue()
        self._arrived: list[Generation] = []  # taken off the queue while idle, admitted at the next step
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self.lock = threading.Lock()  # held for each step: the model changes (adapters come and go) between steps

    def submit(self, work: Generation) -> None:
        self._waiting.put(work)

    @property
    def in_flight(self) -> int:
        return len(self._rows) + len(self._arrived) + self._waiting.qsize()

    def run(self, stop: threading.Event) -> None:
        """Run steps until `stop` is set, on the calling thread. Call it from the main thread: there
        PyTorch's CPU kernels ran a batch of 8 about 1.5x faster than from any other thread (its
        OpenMP workers spin-wait for the main thread only)."""
        while not stop.is_set():
            if not self._rows:
                try:  # sleep until there is work
                    self._arrived.append(self._waiting.get(timeout=0.2))
                except queue.Empty:
                    continue
            try:
                with self.lock:
                    self._step()
            except Exception:
                log.exception("a batch step failed; its requests end with an error")
                for row in self._rows:
                    self._deliver(row, "", "error")
                self._rows, self._cache, self._mask = [], None, None

    def _step(self) -> None:
        import torch

        with torch.inference_mode():
            if self._rows:
                self._decode()
            arrivals, self._arrived = self._arrived, []
            while len(self._rows) + len(arrivals) < self.max_batch:
                try:
                    arrivals.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            arrivals = [work for work in arrivals if not work.canceled.is_set()]
            if arrivals:
                self._prefill(arrivals)
        self._retire()

    def _forward(self, rows: list[_Row], **inputs: Any) -> torch.Tensor:
        if hasattr(self.model, "peft_config"):  # a PeftModel: each row names its adapter
            names = [row.work.adapter or BASE_ADAPTER for row in rows]
            if len(set(names)) > 1 or names[0] == BASE_ADAPTER:
                inputs["adapter_names"] = names
            elif self.model.active_adapter != names[0]:  # one adapter for all: PEFT's faster unmixed path
                self.model.set_adapter(names[0])
        # Only the last position's logits are needed: skips the vocabulary projection of the prompt.
        return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1, :]

    def _prefill(self, arrivals: list[Generation]) -> None:
        import torch
        from transformers import DynamicCache

        longest = max(len(work.prompt) for work in arrivals)
        ids = torch.tensor([[self.pad_id] * (longest - len(w.prompt)) + w.prompt for w in arrivals])
        mask = torch.tensor([[0] * (longest - len(w.prompt)) + [1] * len(w.prompt) for w in arrivals])
        rows = [_Row(work, time.monotonic(), _generator(work.sampling)) for work in arrivals]
        cache: Any = DynamicCache()  # its layers hold `keys` and `values` [batch, heads, length, dim]
        logits = self._forward(
            rows,
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
            cache=cache,
        )
        self._choose(rows, logits)
        if self._cache is None:
            self._rows, self._cache, self._mask = rows, cache, mask.to(self.device)
            return
        assert self._mask is not None
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask.to(self.device), width, dim=1)])
        self._rows += rows

    def _decode(self) -> None:
        import torch

        assert self._mask is not None
        rows = self._rows
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(
            rows,
            input_ids=torch.tensor([[row.pending] for row in rows], device=self.device),
            attention_mask=self._mask,
            position_ids=(self._mask.sum(-1, keepdim=True) - 1),
            cache=self._cache,
        )
        self._choose(rows, logits)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        import torch

        greedy = logits.argmax(-1).tolist()
        for index, row in enumerate(rows):
            sampling = row.work.sampling
            if sampling is None:
                token = greedy[index]
            else:
                probabilities = torch.softmax(logits[index].float() / sampling.temperature, -1)
                token = _sample(probabilities, sampling.top_p, row.generator)
            row.tokens.append(token)
            row.pending = token

    def _retire(self) -> None:
        """Deliver each row's new text; drop the rows that ended from the batch and its cache."""
        import torch

        keep = []
        for index, row in enumerate(self._rows):
            reason = self._finish_reason(row)
            if reason == "canceled":
                continue
            text, reason = self._text(row, reason)
            if text or reason:
                self._deliver(row, text, reason)
            if reason is None:
                keep.append(index)
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None
        selected = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(selected)
        self._mask = self._mask[selected]
        # Columns that every remaining row masks out (pads, and rows that left) can go.
        first = int(self._mask.any(0).nonzero()[0])
        if first:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        self._rows = [self._rows[index] for index in keep]

    def _finish_reason(self, row: _Row) -> str | None:
        if row.work.canceled.is_set():
            return "canceled"
        if row.tokens[-1] in self.stop_ids:
            return "stop"
        if len(row.tokens) >= row.work.max_new_tokens or len(row.work.prompt) + len(row.tokens) >= self.context_length:
            return "length"
        if time.monotonic() - row.started >= row.work.time_limit_s:
            return "timeout"
        return None

    def _text(self, row: _Row, reason: str | None) -> tuple[str, str | None]:
        """The text not shown yet, cut at a stop string; held back while it may still become one
        (or ends in half a character)."""
        text = str(self.tokenizer.decode(row.tokens, skip_special_tokens=True))
        stops = [(text.find(stop, max(0, row.shown - len(stop))), stop) for stop in row.work.stop]
        found = [at for at, _ in stops if at >= 0]
        if found:
            text, reason = text[: min(found)], "stop"
        elif reason is None:
            hold = max((n for stop in row.work.stop for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
            text = text[: len(text) - hold].rstrip("\ufffd")
        new = text[row.shown :]
        row.shown = max(row.shown, len(text))
        return new, reason

    def _deliver(self, row: _Row, text: str, reason: str | None) -> None:
        try:
            row.work.deliver(Step(text, reason, len(row.work.prompt), len(row.tokens)))
        except Exception:  # a receiver that is gone must not stop the batch
            log.exception("could not deliver a step")


def _generator(sampling: Sampling | None) -> torch.Generator | None:
    import torch

    if sampling is None:
        return None
    generator = torch.Generator()
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


def _sample(probabilities: torch.Tensor, top_p: float, generator: torch.Generator | None) -> int:
    import torch

    probabilities = probabilities.cpu()
    if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        ordered, order = probabilities.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > top_p
        ordered[outside] = 0.0
        probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    import torch

    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
