"""An OpenAI-compatible HTTP server for one `DashModel` (`dashskip serve`).

The model is fixed when the server starts; requests may only name its served name, so a `model` field can never
make the server open a path. Generation runs on the scheduler's thread (`serve/scheduler.py`): concurrent
requests decode together in one engine step, each at its own operating point, and prompts are prefilled in
chunks between steps. A client that goes away sets its job's cancel flag and its row leaves the batch at the
next token. Requests are checked before any work: JSON bodies only (a web page cannot post a "simple" request),
the Host header against the bind address (DNS rebinding), an optional API key, valid Unicode in every string.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from dashskip.api import DashModel
from dashskip.core.operating import OperatingPoint
from dashskip.errors import DashskipError
from dashskip.models.chat import chat_input_ids
from dashskip.serve.scheduler import BatchLimits, Busy, Finished, Job, Scheduler

log = logging.getLogger("dashskip.serve.server")


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; each bound keeps a single client from monopolising the model."""

    max_tokens: int = 512  # new tokens per request
    max_prompt_tokens: int = 4096  # prompt tokens per request
    max_body_bytes: int = 1 << 20  # request body size
    batch: BatchLimits = field(default_factory=BatchLimits)  # rows per step, queue length and work, queue time


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Security:
    """Who may talk to the server. `allowed_hosts`: the Host header values accepted (None: the bind address and,
    on loopback, the loopback names; "*" accepts any); `api_key`: required as `Authorization: Bearer KEY` on
    /v1/...; `special_in_content`: chat content may spell special tokens (off: they are text)."""

    allowed_hosts: tuple[str, ...] | None = None
    api_key: str | None = None
    special_in_content: bool = False

    def hosts_for(self, bind: str) -> tuple[str, ...]:
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return (*LOOPBACK_HOSTS, bind) if bind in LOOPBACK_HOSTS else (bind,)


class APIError(Exception):
    """A request the server refuses, answered with OpenAI's error body so clients raise their usual exceptions."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def busy(exc: Busy) -> APIError:
    kind = "server_busy" if exc.status == 429 else "server_overloaded"
    return APIError(exc.status, str(exc), code="queue_full" if exc.status == 429 else "queue_timeout", kind=kind,
                    headers={"Retry-After": str(exc.retry_after)})  # fmt: skip


def find_lone_surrogate(data: Any, where: str = "") -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (valid JSON escapes, but no text)."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if isinstance(key, str) and find_lone_surrogate(key) is not None:
            return where or "body"
        found = find_lone_surrogate(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------- requests


class _Strict(BaseModel):
    # strict: "0.5" is not a temperature; forbid: a misspelt field is an error, not silently ignored
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """Fields both endpoints share, with OpenAI's names, defaults and ranges, plus dashskip's extras."""

    model: str = Field(max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    speedup: float | None = Field(None, ge=1.0, allow_inf_nan=False)
    lossless: bool = False


class CompletionRequest(_Generation):
    prompt: str | list[int]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=256)

    def as_template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


HINTS = {
    "prompt": "a string or a list of token ids",
    "messages": "a non-empty list of {role, content} objects with role system, user or assistant",
}


def _validation_error(exc: ValidationError) -> APIError:
    """The first problem as one line naming the field; the raw input is never echoed back."""
    err = exc.errors()[0]
    if not err["loc"]:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    param = str(err["loc"][0])
    # pydantic puts the member of a union it tried into the location ('str', 'list[int]'); users never wrote those
    where = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and (p == "str" or "[" in p)))
    if err["type"] == "extra_forbidden":
        return APIError(
            400,
            f"unrecognized request argument '{where}'; see docs/serving.md for the fields this server accepts",
            param,
            "unknown_parameter",
        )
    hint = f" (expected {HINTS[param]})" if param in HINTS else ""
    return APIError(400, f"invalid '{where}': {err['msg']}{hint}", param, "invalid_value")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes before reading them all."""
    too_large = APIError(413, f"request body exceeds {limit} bytes; send a shorter prompt", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, NaN, 4300+ digit integers, deep nesting
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    where = find_lone_surrogate(data)
    if where is not None:
        param = where.split(".")[0]
        raise APIError(
            400,
            f"invalid '{where}': the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
            "send valid Unicode",
            param,
            "invalid_value",
        )
    return data


RequestT = TypeVar("RequestT", bound=_Generation)


def _parse(data: Any, schema: type[RequestT]) -> RequestT:
    if isinstance(data, dict):  # OpenAI treats an explicit null as "not given"
        data = {k: v for k, v in data.items() if v is not None}
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


# ---------------------------------------------------------------- the worker


def eos_token_ids(model: DashModel) -> list[int]:
    """End-of-sequence ids of both the generation config and the tokenizer (chat models end turns with either)."""
    ids: set[int] = set()
    config = getattr(model.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    return sorted(ids)


# ---------------------------------------------------------------- responses


class Detokenizer:
    """Text deltas from a growing token list; holds back a character whose UTF-8 bytes are not complete yet."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._advance(text)

    def flush(self) -> str:
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        delta = text[len(self.sent) :]
        self.sent = text
        return delta


@dataclass
class Reply:
    """The shape of one answer: the chat or the completion object, whole or as stream chunks."""

    chat: bool
    model: str
    prompt_tokens: int
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, done: Finished) -> dict[str, int]:
        n = len(done.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def whole(self, text: str, done: Finished) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": done.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": [choice], "usage": self.usage(done), "dashskip": done.dashskip}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = (
                {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            )
        else:
            choice["text"] = text or ""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.usage(done)}


def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a body can always be encoded, whatever text it quotes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(exc: APIError) -> JSONResponse:
    return AsciiJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# ---------------------------------------------------------------- the service


class Service:
    """Turns validated requests into jobs for the scheduler and jobs into OpenAI-shaped answers."""

    def __init__(self, model: DashModel, served_name: str, limits: ServerLimits, security: Security) -> None:
        if model.tokenizer is None:
            raise DashskipError("the server needs the model's tokenizer; load the model with dashskip.from_pretrained")
        self.model = model
        self.name = served_name
        self.limits = limits
        self.security = security
        self.default_point = model.point
        self.scheduler = Scheduler(model, eos_token_ids(model), limits.batch)
        # Tokenizing a long prompt takes tens of ms: never on the event loop, which streams the other requests.
        # One thread for encoding, which is where a fast tokenizer could change its truncation settings (the one
        # use it refuses concurrently, "Already borrowed"); the streams' decoding, which only reads, stays on the
        # event loop.
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="dashskip-tokenize")
        self.left_mid_upload = 0  # clients that left while sending their body (answered 499, nobody's error)
        self.context = getattr(model.config, "max_position_embeddings", None)

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(
                404,
                f"model '{name}' is not served here; this server serves '{self.name}' (see /v1/models)",
                "model",
                "model_not_found",
            )

    def operating_point(self, speedup: float | None) -> OperatingPoint:
        """The request's operating point, resolved as the model resolves any (`DashModel.operating_point`: decode
        wall clock on this machine unless the model was built for compute ratios). An unreachable one is refused
        here, before queueing, so the client gets a 400 naming the reach, and the scheduler never sees it."""
        if speedup is None:
            return self.default_point
        if speedup != 1.0 and self.model.policy is None:
            raise APIError(
                400,
                f"speedup {speedup:g} needs a trained policy and this server has none; "
                "start it with `dashskip serve --policy FILE`, or ask for speedup 1.0",
                "speedup",
                "unsupported",
            )
        try:
            return self.model.operating_point(speedup)
        except DashskipError as exc:
            raise APIError(400, str(exc), "speedup", "invalid_value") from None

    async def tokenized(self, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        """`fn(*args)` (tokenizing a prompt or chat) on the tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.model.tokenizer(prompt)["input_ids"]
        else:
            vocab = self.model.config.vocab_size
            if any(not 0 <= i < vocab for i in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt", "invalid_value")
            ids = prompt
        return list(ids)

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        try:
            return chat_input_ids(
                self.model.tokenizer, [m.as_template_input() for m in messages], self.security.special_in_content
            )
        except DashskipError as exc:
            raise APIError(400, str(exc), "messages", "invalid_value") from None

    def job(self, req: _Generation, ids: list[int], asked: int | None, default: int) -> Job:
        """Check the sampling fields against the server's limits and the model's context."""
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported; send n separate requests", "n", "unsupported")
        if not ids:
            raise APIError(400, "the prompt is empty; give at least one token", "prompt", "invalid_value")
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server takes at most {self.limits.max_prompt_tokens} "
                "(set with `dashskip serve --max-prompt-tokens`); shorten it",
                "prompt",
                "prompt_too_long",
            )
        point = self.operating_point(req.speedup)
        limit = self.limits.max_tokens
        if asked is not None and asked > limit:
            raise APIError(
                400,
                f"max_tokens {asked} exceeds this server's limit of {limit}; ask for fewer "
                "(the limit is set with `dashskip serve --max-tokens`)",
                "max_tokens",
                "invalid_value",
            )
        max_new = asked if asked is not None else min(default, limit)
        if self.context:
            room = self.context - len(ids)
            max_new = max_new if asked is not None else min(max_new, room)
            if room < 1 or max_new > room:
                raise APIError(
                    400,
                    f"this model's context is {self.context} tokens; the prompt has {len(ids)} and {max_new} new "
                    "tokens were asked for; shorten the prompt or lower max_tokens",
                    "max_tokens" if room >= 1 else "prompt",
                    "context_length_exceeded",
                )
        return Job(ids, max_new, req.temperature, req.top_p, req.seed, point, req.lossless)

    def submit(self, job: Job) -> asyncio.Future:
        try:
            return asyncio.wrap_future(self.scheduler.submit(job))
        except Busy as exc:
            raise busy(exc) from None

    async def answer(self, request: Request, req: _Generation, job: Job, chat: bool) -> Response:
        reply = Reply(chat, self.name, len(job.ids))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return await self._stream(request, reply, job, include_usage)
        future = self.submit(job)
        done = await self._unless_disconnected(request, future, job)
        if done is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(reply.whole(self.model.tokenizer.decode(done.tokens, skip_special_tokens=True), done))

    async def _unless_disconnected(
        self, request: Request, future: asyncio.Future, job: Job, until_started: bool = False
    ) -> Finished | None:
        """Wait for the job (or, `until_started`, for it to start), or cancel it if the client disconnects first."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        waits = {future, watcher}
        if until_started:  # an asyncio event set from the scheduler's thread: no thread waits on a job never run
            began = asyncio.Event()
            loop = asyncio.get_running_loop()
            job.on_start = lambda: loop.call_soon_threadsafe(began.set)
            if job.started.is_set():
                began.set()
            waits.add(asyncio.ensure_future(began.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits - {future}:
                waiter.cancel()
            if watcher.done() and not watcher.cancelled() and not future.done():
                job.cancel.set()  # the client left: nobody will read the answer
            elif not until_started and not future.done():
                job.cancel.set()  # the server is stopping
        if until_started or not future.done():  # a started job's outcome, even a failure, goes into its stream
            return None
        return _result(future)

    async def _stream(self, request: Request, reply: Reply, job: Job, include_usage: bool) -> Response:
        """Queue the job and answer once it starts: a request refused in the queue gets its 429/503 as a status,
        not inside a stream. Then server-sent events, always ending with [DONE]."""
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.on_token = lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token)
        future = self.submit(job)
        future.add_done_callback(lambda _: tokens.put_nowait(None))  # after every token: both go through the loop
        await self._unless_disconnected(request, future, job, until_started=True)
        if job.cancel.is_set():
            return Response(status_code=499)
        if future.done() and not job.started.is_set():
            _result(future)  # refused while queued: raises its APIError
        events = self._events(reply, job, future, tokens, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(
        self, reply: Reply, job: Job, future: asyncio.Future, tokens: asyncio.Queue, include_usage: bool
    ) -> AsyncIterator[str]:
        """The stream's events; being cancelled (the client left) sets the job's cancel flag."""
        detok = Detokenizer(self.model.tokenizer)
        try:
            if reply.chat:
                yield _event(reply.chunk(None, first=True))
            while (token := await tokens.get()) is not None:
                if text := detok.push(token):
                    yield _event(reply.chunk(text))
            try:
                done = _result(future)
            except APIError as exc:
                done = None
                yield _event(exc.body())
            if done is not None:
                if text := detok.flush():
                    yield _event(reply.chunk(text))
                yield _event({**reply.chunk(None, done.finish_reason), "dashskip": done.dashskip})
                if include_usage:
                    yield _event(reply.usage_chunk(done))
            yield _event("[DONE]")
        finally:
            job.cancel.set()


def _result(future: asyncio.Future) -> Finished | None:
    """The job's outcome; a failure inside generation becomes an OpenAI-style error instead of a dead connection."""
    try:
        return future.result()
    except Busy as exc:
        raise busy(exc) from None
    except DashskipError as exc:
        raise APIError(400, str(exc)) from None
    except Exception as exc:
        log.exception("generation failed")
        raise APIError(500, f"generation failed: {type(exc).__name__}", kind="server_error") from None


# ---------------------------------------------------------------- the app


def _host_name(value: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    return urlsplit(f"//{value}").hostname or ""


def guard(service: Service, request: Request, bind: str) -> None:
    """Refuse what no legitimate client sends: a foreign Host (DNS rebinding) or Origin, a missing API key, a
    body that is not JSON (a web page's form or `text/plain` post)."""
    allowed = service.security.hosts_for(bind)
    if "*" not in allowed:
        host = _host_name(request.headers.get("host", ""))
        if host not in allowed:
            raise APIError(
                403, f"Host '{host}' is not served here; allow it with `dashskip serve --allowed-host {host}`",
                code="host_not_allowed",
            )  # fmt: skip
        origin = request.headers.get("origin")
        if origin is not None and origin != "null" and urlsplit(origin).hostname not in allowed:
            raise APIError(403, f"requests from the web origin '{origin}' are not allowed", code="origin_not_allowed")
    key = service.security.api_key
    if key is not None and request.url.path.startswith("/v1/"):
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key",
                           kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"the body must be JSON with `Content-Type: application/json` (got '{kind or 'none'}')",
                           code="unsupported_media_type")  # fmt: skip


class Guard:
    """Plain ASGI middleware running `guard` before any route. (Starlette's `BaseHTTPMiddleware` would wrap
    `receive` and tell a streaming response its client left when it had not.)"""

    def __init__(self, app: ASGIApp, check: Callable[[Request], None]) -> None:
        self.app, self.check = app, check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                self.check(Request(scope))
            except APIError as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    model: DashModel,
    served_name: str,
    limits: ServerLimits | None = None,
    security: Security | None = None,
    bind: str = "127.0.0.1",
) -> FastAPI:
    """The FastAPI app serving `model` under `served_name`; `app.state.service` holds the scheduler and its
    counters. `bind` is the address the server listens on (the Host header is checked against it)."""
    service = Service(model, served_name, limits or ServerLimits(), security or Security())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.scheduler.close()
        service.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dashskip", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    app.add_middleware(Guard, check=lambda request: guard(service, request, bind))

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}"))

    @app.exception_handler(ClientDisconnect)
    async def client_left(_: Request, exc: ClientDisconnect) -> Response:
        service.left_mid_upload += 1
        return Response(status_code=499)  # the client left while sending its body: nobody reads an answer

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal error ({type(exc).__name__})", kind="server_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the generation loop runs; 503 once it stopped (a load balancer then takes this one out)."""
        alive = service.scheduler.alive
        body = {"status": "ok" if alive else "unavailable", "model": service.name, **service.scheduler.health(),
                "left_mid_upload": service.left_mid_upload}  # fmt: skip
        return JSONResponse(body, status_code=200 if alive else 503)

    def model_card() -> dict[str, Any]:
        return {"id": service.name, "object": "model", "created": 0, "owned_by": "dashskip"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        service.check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = _parse(await read_json(request, service.limits.max_body_bytes), CompletionRequest)
        service.check_model(req.model)
        job = service.job(req, await service.tokenized(service.prompt_ids, req.prompt), req.max_tokens, default=16)
        return await service.answer(request, req, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = _parse(await read_json(request, service.limits.max_body_bytes), ChatRequest)
        service.check_model(req.model)
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        ids = await service.tokenized(service.chat_ids, req.messages)
        job = service.job(req, ids, asked, default=service.limits.max_tokens)
        return await service.answer(request, req, job, chat=True)

    return app


def default_served_name(name_or_path: str) -> str:
    """The name clients must send: an alias or hub id as given, a local folder by its last part only."""
    path = Path(name_or_path).expanduser()
    return path.name if path.exists() else name_or_path


@dataclass
class HTTPServer:
    """A uvicorn server on a socket bound by `listen`."""

    server: uvicorn.Server
    sock: socket.socket

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def run(self) -> None:
        """Serve until stopped (Ctrl-C, or `stop()` from another thread)."""
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = True


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """Bind before loading anything: a busy port is one clear error at once, and port 0 picks a free one."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise DashskipError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None


def make_server(app: FastAPI, sock: socket.socket, log_level: str = "info") -> HTTPServer:
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    return HTTPServer(uvicorn.Server(config), sock)
