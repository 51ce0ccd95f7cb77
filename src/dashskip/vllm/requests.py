"""Which request each row of vLLM's batch belongs to, and at what operating point it runs.

A vLLM model sees one flattened batch of tokens and no request ids. Its logits processors do see requests: before
every forward pass the model runner tells each of them which requests joined the persistent batch (with their
`SamplingParams`), which left and which moved. `DashRequests` is such a processor, registered through the
`vllm.logits_processors` entry point; it changes no logits, it keeps `TABLE`: batch index -> `Request`. The DASH
model reads the table in the same worker process to give each request its own operating point (the request's
`vllm_xargs: {"dash_speedup": 2.0}`, or the model's default) and its own rate controller, and writes back what
each request spent, which is reported when the request leaves the batch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from dashskip.api import bundled_policy
from dashskip.errors import DashskipError
from dashskip.methods.dash.control import RateControl, SequenceState
from dashskip.methods.dash.policy import DashPolicy

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("vllm.dashskip")  # under vLLM's logger: its handlers and format

SPEEDUP_KEY = "dash_speedup"  # the per-request operating point, in `vllm_xargs` / `SamplingParams.extra_args`
# The policy file the model runs, for the API process, which validates requests but never loads the model: the
# plugin names it while vLLM builds its configuration (`name_policy`; plain `vllm serve` or `dashskip serve
# --engine vllm`), so a request beyond the policy's reach is a 400 there, not served at another point than asked
# (where it cannot, a vLLM without configuration hooks, the model runs such a request at its reach with a warning).
POLICY_ENV = "DASHSKIP_VLLM_POLICY"
REPORTS_KEPT = 4096


def requested_speedup(params: SamplingParams) -> float | None:
    """The request's operating point, or None for the model's default; a bad value is refused (HTTP 400)."""
    value = (params.extra_args or {}).get(SPEEDUP_KEY)
    if value is None:
        return None
    try:
        speedup = float(value)
    except (TypeError, ValueError):
        speedup = math.nan
    if not (math.isfinite(speedup) and speedup >= 1.0) or isinstance(value, bool):
        raise VLLMValidationError(f"{SPEEDUP_KEY} must be a number >= 1.0 (1.0 = every layer in full), got {value!r}",
                                  parameter=SPEEDUP_KEY, value=value)  # fmt: skip
    policy = _policy(os.environ.get(POLICY_ENV, ""))
    if policy is not None and speedup > 1.0:  # out of the policy's reach: refused here (400), as our server does
        try:
            policy.operating_point(speedup)
        except DashskipError as exc:
            raise VLLMValidationError(f"{SPEEDUP_KEY}: {exc}", parameter=SPEEDUP_KEY, value=value) from None
    return speedup


def policy_file(hf_config: Any, model_path: str) -> Path | None:
    """The policy a model configuration runs: its `dash_policy`, else the one shipped for the alias a
    dashskip-made model folder came from (its `dashskip_source.json`); None where it names none."""
    named = getattr(hf_config, "dash_policy", None)
    if named:
        return Path(named)
    source = Path(model_path) / "dashskip_source.json"
    if not source.is_file():
        return None
    return bundled_policy(json.loads(source.read_text())["alias"])


def name_policy(hf_config: Any, model_path: str) -> None:
    """Name to this process the policy its model configuration runs (`POLICY_ENV`), so that requests are checked
    against its reach here. Called while vLLM builds its configuration, in its API process too
    (`dashskip.vllm.register` hooks it in), which validates requests but never loads the model. Process-wide:
    an offline `vllm.LLM` refuses such a request too, and where one process builds several configurations, the
    last one built names the policy."""
    policy = policy_file(hf_config, model_path)
    if policy is not None and policy.is_file():
        os.environ[POLICY_ENV] = str(policy)


@functools.cache
def _policy(path: str) -> DashPolicy | None:
    """The policy named to this process, loaded once; None (warned once) where none is named or it cannot be read,
    a server's misconfiguration that no request should be blamed for (the model refuses to load it anyway)."""
    if not path:
        return None
    try:
        return DashPolicy.load(path)
    except DashskipError as exc:
        log.warning("dashskip: %s is not a usable policy (%s); requests' dash_speedup is not checked against it",
                    POLICY_ENV, exc)  # fmt: skip
        return None


@dataclass
class Request:
    """One request in the batch: what it asked for, and its sequence's state (`SequenceState`, made by the model
    when it first runs the request: the bias of the operating point it runs at, and its controller: what its
    produced tokens spent), kept here in vLLM's input batch as dashskip's scheduler keeps it with each request."""

    speedup: float | None  # None: the model's default operating point
    prompt_len: int
    outputs: list[int] = field(default_factory=list)  # vLLM's live list of the request's output tokens
    params: SamplingParams | None = None  # identifies the request when vLLM adds it back after preempting it
    sequence: SequenceState | None = None

    @property
    def control(self) -> RateControl | None:
        """The sequence's controller (every request the model ran has one, steering or only counting)."""
        return None if self.sequence is None else self.sequence.control

    @property
    def counted(self) -> int:
        """Tokens counted: the prompt's last and each decoded one."""
        return int(self.control.counted.sum()) if self.control is not None and self.control.counted.numel() else 0

    def produces(self, computed: int) -> bool:
        """Whether a chunk ending at `computed` tokens yields a token: the prompt and every output so far are in
        (a preempted request's recomputed chunks are not)."""
        return computed >= self.prompt_len + len(self.outputs)


@dataclass(frozen=True)
class Report:
    """A request that left the batch (finished, aborted or preempted: one vLLM resumes reports again when it
    leaves, counting all its tokens): the compute ratio it ran at."""

    target: float
    compute_ratio: float
    tokens: int
    prompt_len: int


@dataclass
class RequestTable:
    """Batch index -> request, kept in step with vLLM's persistent batch by `DashRequests`."""

    slots: dict[int, Request] = field(default_factory=dict)
    reports: deque[Report] = field(default_factory=lambda: deque(maxlen=REPORTS_KEPT))
    # Requests that left, by their SamplingParams' id: one vLLM adds back (after preempting it) resumes its count
    # and controller. The entry holds the params, so the id cannot be reused while it is kept.
    left: dict[int, Request] = field(default_factory=dict)

    def update(self, batch: BatchUpdate) -> None:
        """vLLM's order: removed, added, moved."""
        for index in batch.removed:
            self._leave(index)
        for index, params, prompt, outputs in batch.added:
            self._leave(index)  # an added request may replace one at the same index
            request = self.left.pop(id(params), None)
            if request is None or request.params is not params:
                request = Request(requested_speedup(params), len(prompt or ()), outputs, params)
            request.outputs = outputs
            self.slots[index] = request
        for a, b, direction in batch.moved:
            if direction == MoveDirectionality.UNIDIRECTIONAL:
                self._leave(b)  # vLLM condenses the batch onto a finished request's index without removing it
            first, second = self.slots.pop(a, None), self.slots.pop(b, None)
            if first is not None:
                self.slots[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.slots[a] = second

    def _leave(self, index: int) -> None:
        request = self.slots.pop(index, None)
        if request is None:
            return
        self.left[id(request.params)] = request
        while len(self.left) > REPORTS_KEPT:
            self.left.pop(next(iter(self.left)))
        if request.counted == 0 or request.control is None:
            return
        ratio, target = request.control.compute_ratio(), request.control.target
        self.reports.append(Report(target, ratio, request.counted, request.prompt_len))
        log.info("dashskip: request left the batch after %d tokens at compute ratio %.3f (asked %.2f)",
                 request.counted, ratio, target)  # fmt: skip


TABLE = RequestTable()  # one per worker process: the model and the processor live in the same one


class DashRequests(LogitsProcessor):
    """Keeps `TABLE` in step with the batch; leaves the logits as they are."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        requested_speedup(sampling_params)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        TABLE.slots.clear()
        TABLE.left.clear()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            TABLE.update(batch_update)
