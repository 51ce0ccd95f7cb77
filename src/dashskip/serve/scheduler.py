"""Continuous batching for the server: every running request decodes in one engine step, each row at its own
operating point, and prompts are prefilled in chunks between those steps.

One thread owns the model. Each loop it (1) drops requests whose client left and refuses those that waited too
long, and admits waiting requests while the batch has room, (2) prefills: the short prompts admitted together
in one left-padded step (up to `prefill_chunk` tokens with padding), or, taking turns with them, the next chunk
of a long prompt (long prompts in turn, so none holds the others up by more than a chunk), each row with its
own decider; a request whose prompt is done joins the batch, and (3) runs one decode step for the whole batch:
the rows' caches are one left-padded session, their deciders one (`per_row`: a policy's rows fused into one
scoring call per layer, each with its own bias and controller), and every row samples with
its own settings. A request's states and compute ratio are its own rows'. Lossless requests (one sequence at a
time by nature) run alone between batch steps.

The loop cannot die silently. A job arrives with its operating point resolved (`OperatingPoint`, checked by the
server before queueing), and anything that still fails while admitting it ends that job alone; a failing step
ends the requests in it and the loop goes on. Should the thread ever stop, every waiting and running request
ends with an error at once, `alive` turns False (the server's `/health` answers 503) and new jobs are refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from dashskip.api import DashModel
from dashskip.core.cache import fewest_moves
from dashskip.core.decisions import BatchMajority, Decider, FullFor, per_row
from dashskip.core.operating import OperatingPoint
from dashskip.errors import DashskipError
from dashskip.runtime.engine import Session, StepResult
from dashskip.runtime.generation import (
    GenerateOutput,
    GenerationConfig,
    decode_one_token,
    next_tokens,
    prefill,
)

log = logging.getLogger("dashskip.serve.scheduler")

T = TypeVar("T")


def off_the_main_thread(fn: Callable[[], T]) -> T:
    """`fn()` (loading the model a server will serve) on a thread of its own that ends with it; its result or its
    exception. Why: torch's CPU threads are an OpenMP team per thread that runs parallel work, and GNU OpenMP stops
    spinning between parallel regions once more such threads exist than cores. A model loaded on the main thread
    leaves that thread's team behind, and the scheduler's thread then ran every step slower (docs/serving.md:
    `benchmarks/batched_states.py` with and without `--load-on-main`)."""
    outcome: dict[str, Any] = {}

    def load() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = exc

    # a daemon thread: Ctrl-C during a long load ends the process at once instead of waiting for the load
    thread = threading.Thread(target=load, name="dashskip-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]

BATCH_STATES = ("token", "majority")
BATCH_ROOM = 64  # positions reserved past the batch's when rows join it (more are added by doubling as steps need)


@dataclass(frozen=True)
class BatchLimits:
    # Rows decoded together, and prompt tokens prefilled between two decode steps. Measured in-process on SmolLM2
    # (2 cores, 32 concurrent requests of 128 prompt + 64 new tokens, 1.0x): 87 tok/s at 16 rows and chunks of 256,
    # 108 at 32 rows, 129 at 32 and 1024 (a prompt group's step shares the weight reads over 4x the tokens); with
    # 8 requests the same 76-79. A running stream pauses for one such prefill step (~1-1.5 s there).
    max_batch: int = 32
    prefill_chunk: int = 1024
    max_queue: int = 256  # requests waiting or running
    max_queued_tokens: int = 65536  # prompt + new tokens of every request waiting or running
    max_queue_seconds: float = 60.0  # a request not started by then is refused (503)
    # "token": each request its own states; "majority": per layer, a decode step runs the state most of its rows
    # chose (the RL-adapter paper's batch-majority voting): one set of weight reads for the batch, each request's
    # controller steering what the batch ran, and a request's text then depends on what it is batched with. A
    # request at 1.0x runs in full and does not vote.
    batch_states: str = "token"

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.prefill_chunk < 1:
            raise DashskipError(f"max_batch and prefill_chunk must be >= 1, got {self.max_batch} and "
                                f"{self.prefill_chunk}")  # fmt: skip
        if self.batch_states not in BATCH_STATES:
            raise DashskipError(f"batch states must be one of {', '.join(BATCH_STATES)}, got '{self.batch_states}'")


class Busy(Exception):
    """The queue is full (or too much work waits); `retry_after` seconds is a fair guess when to come back."""

    def __init__(self, message: str, retry_after: int, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


@dataclass(eq=False)
class Job:
    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    point: OperatingPoint | float  # a number is resolved by `Scheduler.submit` (the server resolves it first)
    lossless: bool = False
    on_token: Callable[[int], None] | None = None  # called on the scheduler's thread
    on_start: Callable[[], None] | None = None  # called on the scheduler's thread when the job leaves the queue
    cancel: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)

    @property
    def work(self) -> int:
        return len(self.ids) + self.max_new_tokens


@dataclass
class Finished:
    tokens: list[int]
    finish_reason: str
    dashskip: dict[str, Any]


@dataclass(eq=False)
class Row:
    """A request being prefilled or decoded."""

    job: Job
    decider: Decider
    config: GenerationConfig
    generator: torch.Generator | None
    session: Session | None = None  # its own while prefilling; None once in the batch
    done: int = 0  # prompt tokens prefilled
    tokens: list[int] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)


class Scheduler:
    """Runs every generation of one model on one thread, batching the decode steps of concurrent requests."""

    def __init__(self, model: DashModel, eos: list[int], limits: BatchLimits | None = None) -> None:
        self.model, self.eos, self.limits = model, eos, limits or BatchLimits()
        self.waiting: deque[Job] = deque()
        self.prefilling: list[Row] = []
        self.batch: list[Row] = []
        self.session: Session | None = None  # the batch's rows, in `batch` order
        self.wake = threading.Condition()
        self.stopped = False
        self.generated_tokens = self.cancelled = self.refused = 0
        self.steps = self.batched_rows = self.largest_batch = 0
        self.seconds_per_token = 0.05  # running estimate, for Retry-After
        self.long_turn = False  # whether the last prefill unit was a long prompt's chunk
        self.prefill_steps = self.largest_prefill = 0
        self.failure: BaseException | None = None  # why the loop stopped, if it ever did
        self.thread = threading.Thread(target=self._run, name="dashskip-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ called from the server's threads

    @property
    def jobs(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.batch)

    def queued_work(self) -> int:
        rows = [r.job for r in (*self.prefilling, *self.batch)]
        return sum(j.work for j in (*self.waiting, *rows))

    def retry_after(self, extra: int = 0) -> int:
        """Seconds until the work ahead is likely done, at the measured speed."""
        rows = max(1, min(self.limits.max_batch, self.jobs))
        return max(1, round((self.queued_work() + extra) * self.seconds_per_token / rows))

    @property
    def alive(self) -> bool:
        """Whether the loop runs (and so whether a queued job will ever start)."""
        return self.thread.is_alive() and not self.stopped and self.failure is None

    def submit(self, job: Job) -> Future:
        """Queue a job; its future resolves to `Finished`, to None if it was cancelled, or to an exception. An
        operating point given as a number is resolved here (`DashModel.operating_point`): one out of reach raises
        `DashskipError` to the caller, never in the scheduler's thread."""
        job.point = self.model.operating_point(job.point)
        with self.wake:
            if not self.alive:
                raise Busy("the server's generation loop has stopped; restart the server", 60, status=503)
            if self.jobs >= self.limits.max_queue:
                raise Busy(f"server busy: {self.jobs} requests queued; retry later", self.retry_after())
            if self.queued_work() + job.work > self.limits.max_queued_tokens:
                raise Busy(
                    f"server busy: {self.queued_work()} tokens of work queued (limit {self.limits.max_queued_tokens});"
                    " retry later, or ask for fewer tokens",
                    self.retry_after(job.work),
                )
            self.waiting.append(job)
            self.wake.notify()
        return job.future

    def close(self) -> None:
        with self.wake:
            self.stopped = True
            for job in [*self.waiting, *(r.job for r in (*self.prefilling, *self.batch))]:
                job.cancel.set()
            self.wake.notify()
        self.thread.join(10)

    def health(self) -> dict[str, Any]:
        return {
            "scheduler": "running" if self.alive else "stopped",
            "queued": self.jobs,
            "waiting": len(self.waiting),
            "running": len(self.prefilling) + len(self.batch),
            "generated_tokens": self.generated_tokens,
            "cancelled": self.cancelled,
            "refused": self.refused,
            "decode_steps": self.steps,
            "mean_batch": round(self.batched_rows / self.steps, 2) if self.steps else 0.0,
            "largest_batch": self.largest_batch,
            "prefill_steps": self.prefill_steps,
            "largest_prefill": self.largest_prefill,
        }

    # ------------------------------------------------------------ the scheduler's thread

    def _run(self) -> None:
        """The thread: the loop, and if it ever ends by an error, every request ended with it."""
        try:
            self._loop()
        except BaseException as exc:
            log.exception("the scheduler's loop stopped; every request now fails (restart the server)")
            self.failure = exc
            self._fail_all(exc if isinstance(exc, Exception) else RuntimeError("the generation loop stopped"), True)
            return
        self._fail_all(None, True)

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.stopped and not (self.waiting or self.prefilling or self.batch):
                    self.wake.wait()
                if self.stopped:
                    break
                self._expire()
                job = self._admit()
            try:
                if job is not None:
                    self._lossless(job)
                    continue
                if self.prefilling:
                    self._prefill()
                if self.batch:
                    self._decode()
            except Exception as exc:  # the server must outlive a failing step; its requests end with the error
                log.exception("generation step failed")
                self._fail_all(exc)

    def _expire(self) -> None:
        """Drop waiting jobs whose client left; refuse those that waited past the limit."""
        now = time.monotonic()
        for job in list(self.waiting):
            if job.cancel.is_set():
                self.waiting.remove(job)
                self.cancelled += 1
                _settle(job.future, None)
            elif now - job.queued_at > self.limits.max_queue_seconds:
                self.waiting.remove(job)
                self.refused += 1
                _settle(job.future, Busy(f"the request waited {now - job.queued_at:.0f} s without starting (limit "
                                         f"{self.limits.max_queue_seconds:.0f} s); retry later", self.retry_after(),
                                         status=503))  # fmt: skip

    def _admit(self) -> Job | None:
        """Start waiting jobs while the batch has room; a lossless one is returned to run alone."""
        while self.waiting and len(self.prefilling) + len(self.batch) < self.limits.max_batch:
            job = self.waiting[0]
            if job.lossless and (self.prefilling or self.batch):
                return None  # it runs alone: the running ones finish first (new jobs wait behind it)
            self.waiting.popleft()
            job.started.set()
            try:
                if not _call(job.on_start):  # nobody can receive this request's answer
                    self.cancelled += 1
                    _settle(job.future, None)
                    continue
                if job.lossless:
                    return job
                self.prefilling.append(self._row(job))
            except Exception as exc:  # this job's problem alone: it ends with the error, the others go on
                log.exception("a request could not start")
                _settle(job.future, exc)
        return None

    def _row(self, job: Job) -> Row:
        generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        config = self.model.generation_config(
            max_new_tokens=job.max_new_tokens, do_sample=job.temperature > 0, temperature=job.temperature or 1.0,
            top_p=job.top_p, eos_token_id=self.eos,
        )  # fmt: skip
        return Row(job, self.model.decider_for(job.point), config, generator)

    def _prefill(self) -> None:
        """One unit of prefill: the short prompts together, or one chunk of a long one; they take turns."""
        for row in [r for r in self.prefilling if r.job.cancel.is_set()]:
            self.prefilling.remove(row)
            self._finish(row, None)
        chunk = self.limits.prefill_chunk
        short, group = [r for r in self.prefilling if r.done == 0 and len(r.job.ids) <= chunk], []
        for row in short:  # oldest first, as many as fit one chunk with their padding
            if group and (len(group) + 1) * max(len(r.job.ids) for r in (*group, row)) > chunk:
                break
            group.append(row)
        long = [r for r in self.prefilling if r not in short]
        self.long_turn = bool(long) and (not group or not self.long_turn)
        if self.long_turn:
            self._prefill_chunk(long[0])
        elif group:
            self._prefill_together(group)

    def _prefill_together(self, rows: list[Row]) -> None:
        """Whole prompts of several requests in one step, left-padded, each row with its own decider."""
        width = max(len(r.job.ids) for r in rows)
        ids = torch.tensor([[0] * (width - len(r.job.ids)) + r.job.ids for r in rows])
        mask = torch.tensor([[0] * (width - len(r.job.ids)) + [1] * len(r.job.ids) for r in rows])
        session = self.model.engine.new_session(len(rows), capacity=width + max(r.job.max_new_tokens for r in rows))
        result = prefill(self.model.engine, session, ids, per_row([r.decider for r in rows]),
                         None if bool(mask.all()) else mask)  # fmt: skip
        self.prefill_steps += 1
        self.largest_prefill = max(self.largest_prefill, len(rows))
        for row in rows:
            row.done = len(row.job.ids)
            self.prefilling.remove(row)
        self._prompts_done(rows, session, result)

    def _prefill_chunk(self, row: Row) -> None:
        """The next chunk of one long prompt, alone; it then goes to the back of the prefilling rows."""
        if row.session is None:
            row.session = self.model.engine.new_session(1, capacity=len(row.job.ids) + row.job.max_new_tokens)
        chunk = row.job.ids[row.done : row.done + self.limits.prefill_chunk]
        last = row.done + len(chunk) == len(row.job.ids)
        result = prefill(self.model.engine, row.session, torch.tensor([chunk]), row.decider, last=last)
        self.prefill_steps += 1
        row.done += len(chunk)
        self.prefilling.remove(row)
        if row.done < len(row.job.ids):
            self.prefilling.append(row)
            return
        session, row.session = row.session, None
        self._prompts_done([row], session, result)

    def _prompts_done(self, rows: list[Row], session: Session, result: StepResult) -> None:
        """Each row's first token from its prompt's last position; the rows that go on join the batch."""
        keep = fewest_moves(self._advance(rows, result))
        if not keep:
            return
        if len(keep) < len(rows):
            session.keep(keep)
        self.batch.extend(rows[i] for i in keep)
        if self.session is None:
            self.session = session
        else:
            self.session.append(session, room=BATCH_ROOM, most=self.limits.max_batch)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        rows, session = self.batch, self.session
        tokens = torch.tensor([r.tokens[-1] for r in rows])
        decider = per_row([r.decider for r in rows])  # one scoring call per layer for the batch, a bias per row
        if self.limits.batch_states == "majority" and len(rows) > 1:  # a request at 1.0x stays in full
            full = torch.tensor([type(r.decider) is Decider for r in rows])[:, None]
            decider = BatchMajority(decider, ~full)
            decider = FullFor(decider, full) if bool(full.any()) else decider
        keep = fewest_moves(self._advance(rows, decode_one_token(self.model.engine, session, tokens, decider)))
        self.steps += 1
        self.batched_rows += len(rows)
        self.largest_batch = max(self.largest_batch, len(rows))
        self.seconds_per_token = 0.9 * self.seconds_per_token + 0.1 * (time.perf_counter() - t0)
        if len(keep) < len(rows):
            self.batch = [rows[i] for i in keep]
            if keep:
                session.keep(keep)
            else:
                self.session = None

    def _advance(self, rows: list[Row], result: StepResult) -> list[int]:
        """Each row's next token from the step's last position, sampled with its own settings, passed on; the
        indices of the rows that go on."""
        tokens = next_tokens(self.model.engine, result, [r.config for r in rows], [r.generator for r in rows])
        return [i for i, row in enumerate(rows) if not self._emit(row, tokens[i], result.states[i, -1])]

    def _emit(self, row: Row, token: int, states: torch.Tensor) -> bool:
        """Pass one new token on; True when the row has finished (EOS, its length, or its client left)."""
        job = row.job
        if job.cancel.is_set():
            self._finish(row, None)
            return True
        row.tokens.append(token)
        row.states.append(states)
        self.generated_tokens += 1
        if not _call(job.on_token, token):  # the server can no longer pass it on: nobody reads this request
            self._finish(row, None)
            return True
        if token in self.eos or len(row.tokens) >= job.max_new_tokens:
            self._finish(row, "stop" if token in self.eos else "length")
            return True
        return False

    def _finish(self, row: Row, reason: str | None) -> None:
        if reason is None:
            self.cancelled += 1
            _settle(row.job.future, None)
            return
        states = torch.stack(row.states)[None]
        stats = _stats(self.model, states, row.decider.traits.decisions)
        _settle(row.job.future, Finished(row.tokens, reason, _report(row.job, stats)))

    def _lossless(self, job: Job) -> None:
        """A lossless request alone: drafts and verification of one sequence."""
        generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        stream = _Stream(job, self)
        try:
            out = self.model.generate(
                torch.tensor([job.ids]), max_new_tokens=job.max_new_tokens, do_sample=job.temperature > 0,
                temperature=job.temperature or 1.0, top_p=job.top_p, eos_token_id=self.eos, streamer=stream,
                return_dict_in_generate=True, generator=generator, speedup=job.point, lossless=True,
            )  # fmt: skip
        except _Cancelled:
            self.cancelled += 1
            _settle(job.future, None)
            return
        except Exception as exc:
            _settle(job.future, exc)
            return
        tokens = out.sequences[0, len(job.ids) :].tolist()
        stats = {**_stats(self.model, out.states), "lossless": out.speculative.as_dict()}
        reason = "stop" if tokens and tokens[-1] in self.eos else "length"
        _settle(job.future, Finished(tokens, reason, _report(job, stats)))

    def _fail_all(self, exc: Exception | None, waiting: bool = False) -> None:
        """Every running request (and, `waiting`, every queued one) ends with `exc`, or as cancelled (None)."""
        with self.wake:
            rows = [*self.prefilling, *self.batch]
            jobs = [*(r.job for r in rows), *(self.waiting if waiting else [])]
            self.prefilling, self.batch, self.session = [], [], None
            if waiting:
                self.waiting.clear()
        for job in jobs:
            _settle(job.future, exc)


def _settle(future: Future, outcome: Finished | BaseException | None) -> None:
    """Resolve a job's future once (an exception is raised to its waiter); one already settled or cancelled by its
    waiter is left as it is."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass


def _call(callback: Callable[..., None] | None, *args: Any) -> bool:
    """Run a job's callback; False when it failed (the server's event loop is gone), which ends that job only."""
    if callback is None:
        return True
    try:
        callback(*args)
    except Exception:
        log.warning("a request's callback failed; the request is dropped", exc_info=True)
        return False
    return True


def _report(job: Job, stats: dict[str, Any]) -> dict[str, Any]:
    """What a finished request reports: the operating point it asked for (and what it resolved to) and ran at."""
    return {"speedup": job.point.asked, "operating_point": job.point.as_dict(), **stats}


def _stats(model: DashModel, states: torch.Tensor, decisions: str | None = None) -> dict[str, Any]:
    """What a finished request reports: its decode speedup as the cost table predicts it, compute ratio, states."""
    speedup = model.costs.speedup(states, model.backbone.head_precision, decisions)
    stats = GenerateOutput(torch.empty(0), states, model.costs.compute_ratio(states), speedup=speedup).stats()
    return {key: stats[key] for key in ("predicted_speedup", "compute_ratio", "state_fractions")}


class _Cancelled(Exception):
    pass


class _Stream:
    """The streamer of a lossless job: passes tokens on, stops generation when the client left."""

    def __init__(self, job: Job, scheduler: Scheduler) -> None:
        self.job, self.scheduler, self.prompt_seen = job, scheduler, False

    def put(self, value: torch.Tensor) -> None:
        if self.job.cancel.is_set():
            raise _Cancelled
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.scheduler.generated_tokens += 1
        if not _call(self.job.on_token, int(value.reshape(-1)[0])):
            raise _Cancelled

    def end(self) -> None:
        """Nothing to flush: the answer is the tokens passed on."""

