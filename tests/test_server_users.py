"""The server on the settings users run, and what must never happen to it.

Users run the real model with its shipped policy and `speedup` as decode wall clock on their host (the default),
not the compute ratios of a random policy the other server tests use. There, a request at a speedup between the
host's wall-clock reach and the policy's compute-ratio reach once passed the server's check (read as a ratio) and
killed the scheduler's thread (read as a speedup): every later request hung while `/health` said "ok". Here:
any operating point, valid or not, is answered within a bound while valid requests run beside it; a failing
engine step ends its own requests with a 500 and the server goes on; a scheduler that does stop says so (503 on
`/health` and at once to new requests) and ends every stream with an error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.requests import Request

from dashskip.api import DashModel
from dashskip.serve.scheduler import Job
from dashskip.serve.server import Reply, ServerLimits
from tests.conftest import NAME, running, tiny_policy, tiny_smol, within_reach

BOUND = 120  # seconds any one request may take here (a generous bound for a slow 2-core host, not a timing check)


def _ask(url: str, body: dict | str, stream: bool = False) -> tuple[int, str]:
    """(status, body text) of one completion request, bounded in time; a hang fails the test instead of stalling."""
    content = body if isinstance(body, str) else json.dumps(body)
    with httpx.Client(base_url=url, timeout=BOUND) as http:
        response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        return response.status_code, response.text


def _stream_ended(text: str) -> bool:
    """A stream's last event is [DONE] (an error, if any, comes as an event before it)."""
    return text.rstrip().endswith("data: [DONE]")


@pytest.mark.real
def test_every_operating_point_is_answered_and_the_server_keeps_serving(smollm2):
    """The stall of issue 34: values between the wall-clock reach and the ratio reach, the reach's edges, and
    nonsense, sent while valid requests (plain and streamed) run; every request ends within the bound, the
    unreachable ones with a 400 naming the reach, the others with 200; afterwards the server still serves."""
    reach = smollm2.operating_point(1.1).reach  # decode wall clock on this host, fp32 head
    ratio_reach = smollm2.policy.max_speedup(smollm2.costs)  # the compute ratio it reaches on this host's table
    assert reach < ratio_reach  # the head and the decisions cost time: the gap where the old server stalled
    between = [round(reach + f * (ratio_reach - reach), 3) for f in (0.1, 0.5, 0.9)]
    edges = [1.0, 1.0 + 1e-9, math.floor(reach * 1000) / 1000, math.ceil(reach * 1000 + 1) / 1000, ratio_reach]
    odd = [0, 0.5, -1, 1e9, 1e308, "2", True, [1.5], {"x": 1}]
    points: list[object] = [*between, *edges, *odd, 1.9, 2.0, 2.2, 2.3]
    valid = {"model": NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    work = [({**valid, "speedup": p}, False) for p in points]
    fine = within_reach(smollm2, 1.2)
    work += [({**valid, "speedup": fine, "stream": s}, s) for s in (False, True, False, True)]
    work += [({**valid, "speedup": p, "stream": True}, True) for p in between]
    with running(smollm2, ServerLimits()) as (url, _), ThreadPoolExecutor(8) as pool:
        t0 = time.monotonic()
        answers = list(pool.map(lambda w: (*_ask(url, w[0]), w), work))
        assert time.monotonic() - t0 < BOUND * 2
        for status, text, (body, stream) in answers:
            asked = body["speedup"]
            reachable = isinstance(asked, int | float) and not isinstance(asked, bool) and 1.0 <= asked <= reach
            if reachable:
                assert status == 200, (asked, text)
                if stream:
                    assert _stream_ended(text), (asked, text)
                else:
                    report = json.loads(text)["dashskip"]
                    assert report["speedup"] == asked
                    assert report["operating_point"]["reach"] == pytest.approx(reach, abs=1e-4)
            else:
                assert status == 400, (asked, text)
                error = json.loads(text)["error"]
                assert error["param"] == "speedup" and "\n" not in error["message"]
                if asked in between:  # the reach on this machine, as a speedup, is named
                    assert f"about {reach:.2f}x" in error["message"] or "out of reach" in error["message"], error
        for status, text, _ in answers:  # the figure a refusal names is one the server then accepts
            named = re.search(r"ask for at most (\d+\.\d\d)", text)
            if status == 400 and named:
                assert _ask(url, {**valid, "speedup": float(named.group(1))})[0] == 200, text
        health = httpx.get(f"{url}/health", timeout=BOUND)
        assert health.status_code == 200 and health.json()["scheduler"] == "running"
        assert health.json()["queued"] == 0
        status, text = _ask(url, {**valid, "speedup": fine})
        assert status == 200 and json.loads(text)["choices"][0]["text"]


@pytest.mark.real
@pytest.mark.parametrize("head, speedup", [("full", 1.2), ("full", 1.4), ("int8", 1.4)])
def test_a_request_at_a_speedup_reports_that_speedup(smollm2, head, speedup):
    """What a request asks is what it reports: the cost table's predicted decode speedup of the states it ran
    within 3% of the one asked, and the compute ratio within 3% of the one the point resolved to (rate control);
    with the fp32 head and with the INT8 one (`dashskip serve --head int8`), where the same speedup is another
    compute ratio."""
    question = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    smollm2.set_head(head)
    try:
        speedup = within_reach(smollm2, speedup)  # with this head
        body = {"model": NAME, "messages": question, "max_tokens": 48, "temperature": 0, "speedup": speedup}
        with running(smollm2, ServerLimits()) as (url, _):
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=BOUND)
    finally:
        smollm2.set_head("full")  # the session's model, as the other tests expect it
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 48  # enough tokens for the controller to hold
    report = response.json()["dashskip"]
    assert abs(report["predicted_speedup"] / speedup - 1) < 0.03, report
    assert abs(report["compute_ratio"] / report["operating_point"]["compute_ratio"] - 1) < 0.03, report
    assert report["operating_point"]["head"] == head


@pytest.mark.real
def test_lossless_requests_on_the_real_model_give_its_full_text(smollm2, by_rule):
    """Lossless through the server on the real model, drafted by the shipped policy and by INT8 (greedy, streamed
    and not): the full model's text. Kernels by rule (`by_rule`): verification's rows round as decoding's one."""
    prompt = "The history of the Roman Empire is"
    base = {"model": NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0}
    with running(smollm2, ServerLimits()) as (url, _):
        status, text = _ask(url, base)
        assert status == 200, text
        full = json.loads(text)["choices"][0]["text"]
        for extra in ({"lossless": True, "speedup": within_reach(smollm2, 1.5)}, {"lossless": True}):
            status, text = _ask(url, {**base, **extra})
            assert status == 200, text
            answer = json.loads(text)
            assert answer["choices"][0]["text"] == full, extra
            assert answer["dashskip"]["lossless"]["rounds"] >= 1
        status, text = _ask(url, {**base, "lossless": True, "stream": True}, stream=True)
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        assert status == 200 and _stream_ended(text) and "".join(c["choices"][0]["text"] for c in chunks) == full


@pytest.fixture
def tiny_server(tokenizer):
    smol = tiny_smol(tokenizer)
    model = DashModel(smol, tokenizer, policy=tiny_policy(smol), wall_clock=False)
    with running(model, ServerLimits(max_tokens=200)) as (url, service):
        yield url, service


def test_a_failing_step_ends_its_requests_with_a_500_and_the_server_goes_on(tiny_server, monkeypatch):
    """An engine step that raises (our bug, not the client's): the requests in it get a 500 (a stream: an error
    event, then [DONE]); the loop survives and the next request is served."""
    url, service = tiny_server
    engine = service.model.engine
    real_step, failed = engine.step, []

    def failing_step(input_ids, *args, **kwargs):
        if input_ids.shape[1] == 1 and not failed:  # the first decode step
            failed.append(True)
            raise RuntimeError("planted failure")
        return real_step(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "step", failing_step)
    body = {"model": NAME, "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
    status, text = _ask(url, body)
    assert status == 500 and json.loads(text)["error"]["type"] == "server_error"
    assert "planted" not in text  # our internals are not the client's business
    failed.clear()
    status, text = _ask(url, {**body, "stream": True})
    assert status == 200 and _stream_ended(text) and '"server_error"' in text
    assert "finish_reason" not in text.split('"server_error"')[1]
    status, text = _ask(url, body)
    assert status == 200 and json.loads(text)["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{url}/health").json()["scheduler"] == "running"


def test_a_stream_whose_job_failed_before_the_handler_looked_still_gets_its_stream(tiny_server, monkeypatch):
    """The race behind a flaky CI run: the job started and its step failed before the stream's handler woke up.
    The stream still opens (200: it had started) and carries the error event, then [DONE]; it was once a bare 500."""
    _, service = tiny_server

    def started_and_failed(job: Job) -> asyncio.Future:
        job.started.set()
        future = asyncio.get_running_loop().create_future()
        future.set_exception(RuntimeError("planted failure"))
        return future

    async def never_disconnects() -> dict:
        await asyncio.Event().wait()
        return {}

    async def stream() -> tuple[int, str]:
        request = Request(
            {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, never_disconnects
        )
        job = Job([1, 2, 3], 4, 0.0, 1.0, None, 1.0)
        response = await service._stream(request, Reply(False, NAME, 3), job, include_usage=False)
        return response.status_code, "".join([part async for part in response.body_iterator])

    monkeypatch.setattr(service, "submit", started_and_failed)
    status, text = asyncio.run(stream())
    assert status == 200 and _stream_ended(text) and '"server_error"' in text and "planted" not in text


def test_a_stopped_scheduler_is_a_503_everywhere_and_ends_every_stream(tiny_server, monkeypatch):
    """A planted error that escapes the loop (outside any step) stops the scheduler: the streams running then end
    with an error event and [DONE], `/health` answers 503, and a new request is refused at once, never queued."""
    url, service = tiny_server
    scheduler = service.scheduler
    body = {"model": NAME, "prompt": "Go on and on", "max_tokens": 200, "temperature": 0, "stream": True}
    original = scheduler._expire
    with httpx.Client(base_url=url, timeout=BOUND) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # tokens flow

            def broken() -> None:
                original()
                raise SystemExit("planted: the loop itself fails")

            monkeypatch.setattr(scheduler, "_expire", broken)
            with scheduler.wake:
                scheduler.wake.notify()
            rest = "\n".join(lines)
        assert rest.rstrip().endswith("data: [DONE]") and '"error"' in rest
        scheduler.thread.join(BOUND)
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["scheduler"] == "stopped"
        t0 = time.monotonic()
        refused = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        assert refused.status_code == 503 and "restart the server" in refused.json()["error"]["message"]
        assert time.monotonic() - t0 < BOUND / 2


def test_batch_majority_runs_one_state_per_layer_and_keeps_a_full_request_full(tokenizer, monkeypatch):
    """`--batch-states majority`: every decode step of several requests runs one state per layer for the requests
    above 1.0x (one set of weight reads), while a request at 1.0x stays in full; a bad value is one line."""
    from dashskip.errors import DashskipError
    from dashskip.serve.scheduler import BatchLimits, Job, Scheduler

    with pytest.raises(DashskipError, match="batch states must be one of token, majority"):
        BatchLimits(batch_states="vote")
    with pytest.raises(DashskipError, match="prefill_chunk must be >= 1"):  # an empty chunk would never finish
        BatchLimits(prefill_chunk=0)
    smol = tiny_smol(tokenizer)
    model = DashModel(smol, tokenizer, policy=tiny_policy(smol), wall_clock=False)
    steps = []
    real_step = model.engine.step

    def recording(input_ids, *args, **kwargs):
        result = real_step(input_ids, *args, **kwargs)
        if input_ids.shape == (4, 1):
            steps.append(result.states[:, 0])
        return result

    monkeypatch.setattr(model.engine, "step", recording)
    scheduler = Scheduler(model, [2], BatchLimits(max_batch=4, batch_states="majority"))
    try:
        prompts = {"Hello": 2.5, "The capital of France is": 2.9, "Once upon a time": 1.0, "1 2 3": 2.5}
        with scheduler.wake:  # all four start together
            jobs = [Job(tokenizer(p)["input_ids"], 8, 0.0, 1.0, None, s) for p, s in prompts.items()]
            for job in jobs:
                scheduler.submit(job)
        assert all(job.future.result(BOUND).tokens for job in jobs)
    finally:
        scheduler.close()
    assert steps, "the four requests never decoded together"
    for states in steps:  # (rows, layers)
        assert bool((states[[0, 1, 3]] == states[0]).all())  # one state per layer for the batch
        assert bool(states[2].eq(4).all())  # the 1.0x request in full
    assert any(bool((s[0] != 4).any()) for s in steps)  # and the batch did run cheaper states


def test_a_client_leaving_mid_upload_is_dropped_quietly(tiny_server, caplog):
    """A body cut off by the client's disconnect is nobody's error: no traceback in the log, and the server goes on
    (it once logged two ~110-line tracebacks per such client)."""
    import logging
    import socket

    url, service = tiny_server
    host, port = url.removeprefix("http://").split(":")
    caplog.set_level(logging.INFO)
    before = service.left_mid_upload
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    "Content-Length: 100000\r\n\r\n")  # fmt: skip
            sock.sendall(head.encode() + b'{"model": "tiny", "prompt": "' + b"x" * 5000)
    deadline = time.monotonic() + BOUND  # the server reads each body, finds its client gone, and counts it
    while service.left_mid_upload < before + 3:
        assert time.monotonic() < deadline, f"{service.left_mid_upload - before} of 3 disconnects seen"
        time.sleep(0.01)
    assert httpx.get(f"{url}/health").json()["left_mid_upload"] == service.left_mid_upload
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    status, text = _ask(url, {"model": NAME, "prompt": "Hello", "max_tokens": 2})
    assert status == 200, text
