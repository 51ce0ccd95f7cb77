"""The HTTP server as clients meet it: a real uvicorn on loopback, the unchanged `openai` client, raw HTTP.

The model is a tiny random Llama whose vocabulary is SmolLM2's, so the real tokenizer and chat template are
used while each token costs milliseconds. References come from a second model with identical weights, run
directly (not through the server), so "correct" means token-identical to plain greedy generation.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dashskip.api import DashModel
from dashskip.models.chat import chat_input_ids
from dashskip.serve.scheduler import BatchLimits, Busy, Job, Scheduler
from dashskip.serve.server import ServerLimits
from tests.conftest import NAME, kernels_by_rule, running, tiny_policy, tiny_smol, within_reach

MAX_TOKENS = 1000


@pytest.fixture(scope="module", autouse=True)
def pinned_kernels():
    """The server's answers are compared token for token with generation alone and with lossless decoding:
    kernels chosen by rule (`kernels_by_rule`), so a batch's rows and verification's rows round as one row does."""
    with kernels_by_rule():
        yield


@pytest.fixture(scope="module")
def served(tokenizer):
    model = tiny_smol(tokenizer)
    dm = DashModel(model, tokenizer, policy=tiny_policy(model), wall_clock=False)  # a random policy: ratios
    with running(dm, ServerLimits(max_tokens=MAX_TOKENS)) as s:
        yield s


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def reference(tokenizer):
    """Same weights as the served model, generating directly: what the server must reproduce."""
    model = DashModel(tiny_smol(tokenizer), tokenizer)

    def continuation(ids: list[int], max_new_tokens: int) -> tuple[str, int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=[2])
        new = out[0, len(ids) :]
        return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())

    return continuation


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-4")


def test_completion_is_plain_greedy_generation(client, tokenizer, reference):
    prompt = "The capital of France is"
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    ids = tokenizer(prompt)["input_ids"]
    text, n = reference(ids, 12)
    assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), n, len(ids) + n)
    extra = out.model_extra["dashskip"]
    assert extra["compute_ratio"] == 1.0 and extra["state_fractions"]["full"] == 1.0 and extra["speedup"] == 1.0
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text


def test_chat_uses_the_tokenizers_chat_template(client, tokenizer, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    ids = chat_input_ids(tokenizer, messages)
    assert ids[:1] == tokenizer.convert_tokens_to_ids(["<|im_start|>"])  # the template, not a hand-made format
    text, _ = reference(ids, 10)
    assert out.choices[0].message.content == text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    parts = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
    ]
    again = client.chat.completions.create(model=NAME, messages=parts, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == text


def test_streaming_chat_matches_the_whole_answer(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length"
    assert finishing[0].model_extra["dashskip"]["compute_ratio"] == 1.0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_streaming_completion_is_server_sent_events_ending_with_done(url, client):
    whole = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text


def test_speedup_moves_the_operating_point_per_request(client):
    fast = client.completions.create(
        model=NAME, prompt="Hello", max_tokens=16, temperature=0, extra_body={"speedup": 2.5}
    )
    assert fast.model_extra["dashskip"]["speedup"] == 2.5
    assert fast.model_extra["dashskip"]["compute_ratio"] == pytest.approx(2.5, rel=0.03)
    assert fast.model_extra["dashskip"]["state_fractions"]["full"] < 1.0
    default = client.completions.create(model=NAME, prompt="Hello", max_tokens=8, temperature=0)
    assert default.model_extra["dashskip"]["speedup"] == 1.0
    assert default.model_extra["dashskip"]["state_fractions"]["full"] == 1.0
    for speedup, message in ((3.5, "above the range this policy was calibrated for"), (0.5, "greater than or equal")):
        with pytest.raises(openai.BadRequestError, match=message) as info:
            client.completions.create(model=NAME, prompt="Hello", max_tokens=4, extra_body={"speedup": speedup})
        assert info.value.body["param"] == "speedup"


def test_lossless_requests_give_the_full_models_tokens(client):
    full = client.completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0)
    for extra in ({"lossless": True, "speedup": 2.5}, {"lossless": True}):  # DASH drafts; INT8 drafts
        lossless = client.completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0,
                                             extra_body=extra)  # fmt: skip
        assert lossless.choices[0].text == full.choices[0].text
        stats = lossless.model_extra["dashskip"]["lossless"]
        assert stats["rounds"] >= 1 and 0 <= stats["acceptance_rate"] <= 1


def test_sampling_is_reproducible_with_a_seed(client):
    def sample(seed: int) -> str:
        args = dict(model=NAME, prompt="Hello", max_tokens=16, temperature=1.5, top_p=0.9, seed=seed)
        return client.completions.create(**args).choices[0].text

    assert sample(1) == sample(1) != sample(2)


COMPLETION = {"model": NAME, "prompt": "hi", "max_tokens": 4}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "path, body, status, param, fragment",
    [
        ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
        ("/v1/completions", b"\xff\xfe\x00", 400, None, "not valid JSON"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "a", "temperature": NaN}', 400, None, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, None, "must be a JSON object"),
        ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model", "not served here"),
        ("/v1/completions", {**COMPLETION, "model": "/etc/passwd"}, 404, "model", "not served here"),
        ("/v1/completions", {**COMPLETION, "model": 7}, 400, "model", "valid string"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model", "Field required"),
        ("/v1/completions", {**COMPLETION, "temperature": -1}, 400, "temperature", "greater than or equal"),
        ("/v1/completions", {**COMPLETION, "temperature": "0.5"}, 400, "temperature", "valid number"),
        ("/v1/completions", {**COMPLETION, "temperature": 1e308}, 400, "temperature", "less than or equal"),
        ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p", "greater than"),
        ("/v1/completions", {**COMPLETION, "n": 2}, 400, "n", "not supported"),
        ("/v1/completions", {**COMPLETION, "n": -1}, 400, "n", "greater than or equal"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", "greater than or equal"),
        ("/v1/completions", {**COMPLETION, "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens", "server's limit"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 10**30}, 400, "max_tokens", "server's limit"),
        ("/v1/completions", {**COMPLETION, "max_tokens": True}, 400, "max_tokens", "valid integer"),
        ("/v1/completions", {**COMPLETION, "seed": -3}, 400, "seed", "greater than or equal"),
        ("/v1/completions", {**COMPLETION, "stream": "yes"}, 400, "stream", "valid boolean"),
        ("/v1/completions", {**COMPLETION, "frequency_penalty": 0.5}, 400, "frequency_penalty", "unrecognized"),
        ("/v1/completions", {**COMPLETION, "prompt": ""}, 400, "prompt", "prompt is empty"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, 10**9]}, 400, "prompt", "token ids must be in"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}, 400, "prompt", "list of token ids"),
        (
            "/v1/completions",
            {**COMPLETION, "prompt": [5] * 3500, "max_tokens": 700},
            400,
            "max_tokens",
            "context is 4096",
        ),
        ("/v1/completions", {**COMPLETION, "prompt": "x" * 1_100_000}, 413, None, "exceeds"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "at least 1"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages", "role"),
        ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "valid list"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages", "'messages.0.content'"),
        (
            "/v1/chat/completions",
            {**CHAT, "stream_options": {"usage": 1}},
            400,
            "stream_options",
            "'stream_options.usage'",
        ),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 5000}, 400, "max_tokens", "server's limit"),
        ("/v1/chat/completions", {**CHAT, "speedup": "fast"}, 400, "speedup", "valid number"),
        ("/v1/nothing", COMPLETION, 404, None, "Not Found"),
    ],
)
def test_bad_requests_get_openai_style_4xx(url, path, body, status, param, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
    assert error["param"] == param
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_wrong_method_is_a_json_405(url):
    response = httpx.get(f"{url}/v1/completions")
    assert response.status_code == 405 and "error" in response.json()


def assert_cancelled_early(url: str, before: dict) -> None:
    """Wait until the worker is idle, however its job ended; then exactly one job was cancelled, early."""
    deadline = time.monotonic() + 300
    while (health := httpx.get(f"{url}/health").json())["queued"]:
        assert time.monotonic() < deadline, "the worker never went idle"
        time.sleep(0.05)
    assert health["cancelled"] == before["cancelled"] + 1
    assert health["generated_tokens"] - before["generated_tokens"] < MAX_TOKENS


def test_a_disconnected_stream_stops_its_generation(url):
    before = httpx.get(f"{url}/health").json()
    body = {"model": NAME, "prompt": "Go on and on", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert sum(1 for line in (next(lines) for _ in range(6)) if line.startswith("data: ")) >= 3
    # the client has closed the connection; wait until the worker is idle, however its job ended
    assert_cancelled_early(url, before)


def test_a_client_giving_up_on_a_plain_request_stops_its_generation(url):
    """The client leaves once tokens are being generated (not after a set time, which a fast host outruns)."""
    before = httpx.get(f"{url}/health").json()
    body = {"model": NAME, "prompt": "Go on and on", "max_tokens": MAX_TOKENS, "temperature": 0}

    async def leave_while_generating() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            request = asyncio.create_task(client.post(f"{url}/v1/completions", json=body))
            while (await client.get(f"{url}/health")).json()["generated_tokens"] == before["generated_tokens"]:
                assert not request.done(), "the request ended before the client could leave"
                await asyncio.sleep(0.005)
            request.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(leave_while_generating())
    assert_cancelled_early(url, before)


def job(tokens: int, prompt: int = 3, **kw) -> Job:
    return Job([5] * prompt, max_new_tokens=tokens, temperature=0.0, top_p=1.0, seed=None, point=1.0, **kw)


def test_a_full_queue_answers_429_with_retry_after(tokenizer):
    scheduler = Scheduler(DashModel(tiny_smol(tokenizer), tokenizer), [2], BatchLimits(max_queue=1))
    try:
        first_job = job(3000)
        first = scheduler.submit(first_job)
        with pytest.raises(Busy, match="server busy: 1 requests queued") as info:
            scheduler.submit(job(2))
        assert info.value.status == 429 and info.value.retry_after >= 1
        first_job.cancel.set()  # the job itself, not a read of the scheduler's lists while its thread moves it
        assert first.result(60) is None and scheduler.jobs == 0
        assert scheduler.submit(job(2)).result(60).tokens  # room again
    finally:
        scheduler.close()


def test_fifty_concurrent_streams_are_all_answered_correctly(url, tokenizer, reference):
    prompts = ["The capital of France is", "Once upon a time", "def main():", "1, 2, 3,", "Dear Sir,"]
    expected = [reference(tokenizer(p)["input_ids"], 12)[0] for p in prompts]
    requests = 50

    async def one(client: openai.AsyncOpenAI, index: int) -> tuple[bool, float]:
        t0 = time.perf_counter()
        try:
            stream = await client.completions.create(
                model=NAME, prompt=prompts[index % 5], max_tokens=12, temperature=0, stream=True
            )
            text = "".join([chunk.choices[0].text async for chunk in stream])
            return text == expected[index % 5], time.perf_counter() - t0
        except openai.OpenAIError:
            return False, time.perf_counter() - t0

    async def load() -> list[tuple[bool, float]]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(requests)))

    results = asyncio.run(load())
    latencies = sorted(seconds for _, seconds in results)
    failures = sum(not ok for ok, _ in results)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    print(f"\nload: {requests} concurrent streams, {failures} failures, p50 {p50:.2f} s, p95 {p95:.2f} s")
    assert failures == 0


# ---------------------------------------------------------------- junk in, 4xx out

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
EDGES = st.sampled_from([NAME, "", 0, -1, 1, 3, 0.5, 2.5, 10**30, -(10**30), 1e308, True, [], {}, "/etc/passwd"])
MESSAGE = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "system", "assistant", "tool"]) | EDGES, "content": JSON | EDGES}
)
FIELD_VALUES = {
    "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 60000), max_size=5),
    "messages": st.lists(MESSAGE, max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | EDGES}),
}
FIELDS = [*FIELD_VALUES, "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", "speedup"]
FIELDS += ["lossless", "user", "stop", "logprobs"]
VALID = {
    "/v1/completions": {"model": NAME, "prompt": "hi", "max_tokens": 3},
    "/v1/chat/completions": {"model": NAME, "messages": [{"role": "user", "content": "hi"}]},
}
PATHS = [*VALID, "/v1/models", "/health", "/v1/embeddings"]


@st.composite
def requests(draw) -> tuple[str, bytes]:
    """A valid request with a few fields changed, dropped or added (so junk reaches the deep code paths),
    or arbitrary JSON, or arbitrary bytes."""
    path = draw(st.sampled_from(PATHS))
    kind = draw(st.sampled_from(["mutated", "mutated", "json", "bytes"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=64))
    if kind == "json":
        return path, json.dumps(draw(JSON)).encode()
    body = dict(VALID.get(path, {}))
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        specific = key in FIELD_VALUES and draw(st.booleans())
        body[key] = draw(FIELD_VALUES[key] if specific else JSON | EDGES)
    for key in draw(st.lists(st.sampled_from(sorted(body) or ["model"]), max_size=1)):
        body.pop(key, None)
    return path, json.dumps(body).encode()


@pytest.fixture(scope="module")
def fuzz_url(tokenizer):
    """A second server, allowed 4 tokens per request, so the valid payloads hypothesis finds stay cheap."""
    with running(DashModel(tiny_smol(tokenizer, seed=1), tokenizer), ServerLimits(max_tokens=4)) as (url, _):
        yield url


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_random_payloads_get_2xx_or_4xx_and_the_server_stays_up(fuzz_url, request):
    path, body = request
    with httpx.Client(base_url=fuzz_url, timeout=60) as http:
        response = http.post(path, content=body, headers={"content-type": "application/json"})
        assert 200 <= response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        elif response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]")
        assert http.get("/health").json()["status"] == "ok"


@pytest.mark.real
def test_the_default_model_and_its_shipped_policy_over_http(smollm2):
    with running(smollm2, ServerLimits()) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        full = client.chat.completions.create(model=NAME, messages=question, max_tokens=12, temperature=0)
        assert "Paris" in full.choices[0].message.content
        fast = client.chat.completions.create(
            model=NAME, messages=question, max_tokens=12, temperature=0,
            extra_body={"speedup": within_reach(smollm2, 1.5)},
        )
        # 12 tokens are too few for the controller to land on the point (48 hold it within 3%: test_server_users)
        assert fast.model_extra["dashskip"]["compute_ratio"] > 1.0
        assert fast.model_extra["dashskip"]["state_fractions"]["full"] < 0.9
