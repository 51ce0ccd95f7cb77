"""An OpenAI-compatible HTTP server for one `DashModel` (`dashskip serve`).

The model is fixed when the server starts; requests may only name its served name, so a `model` field can never
make the server open a path. Every generation runs on one worker thread: the engine and its stateful linears
serve one forward pass at a time, so requests queue in arrival order instead of racing on shared weights. A
streaming client that goes away sets its job's cancel flag, and the worker stops at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from dashskip.api import DashModel
from dashskip.errors import DashskipError
from dashskip.models.chat import chat_input_ids

log = logging.getLogger("dashskip.serve.server")


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; each bound keeps a single client from monopolising the one worker."""

    max_tokens: int = 512  # new tokens per request
    max_body_bytes: int = 1 << 20  # request body size
    max_queue: int = 256  # requests waiting or running; more get 429 instead of unbounded memory


class APIError(Exception):
    """A request the server refuses, answered with OpenAI's error body so clients raise their usual exceptions."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def check_lossless(lossless: bool, speedup: float) -> None:
    """Lossless mode drafts with the DASH path, so it needs an operating point above 1."""
    if lossless and speedup <= 1.0:
        raise APIError(
            400,
            "lossless mode drafts with the DASH path; give a 'speedup' above 1 (e.g. 2.0) with it",
            "lossless",
            "invalid_value",
        )


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
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, NaN, 4300+ digit integers, deep nesting
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None


RequestT = TypeVar("RequestT", bound=_Generation)


def _parse(data: Any, schema: type[RequestT]) -> RequestT:
    if isinstance(data, dict):  # OpenAI treats an explicit null as "not given"
        data = {k: v for k, v in data.items() if v is not None}
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


# ---------------------------------------------------------------- the worker


class Cancelled(Exception):
    """Raised inside `generate` by the streamer when the client has gone, to stop generating at once."""


@dataclass(eq=False)
class Job:
    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    speedup: float
    lossless: bool = False
    on_token: Callable[[int], None] | None = None  # called on the worker thread
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Finished:
    tokens: list[int]
    finish_reason: str
    dashskip: dict[str, Any]


class TokenStream:
    """The `streamer` given to `DashModel.generate`: passes each new token on and checks the cancel flag.

    `generate` calls `put` once with the prompt before prefill, then once per token, all between engine steps,
    so raising here stops cleanly (a job cancelled while queued does no work at all).
    """

    def __init__(self, job: Job, worker: Worker) -> None:
        self.job, self.worker = job, worker
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.job.cancel.is_set():
            raise Cancelled
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.worker.generated_tokens += 1
        if self.job.on_token is not None:
            self.job.on_token(int(value.reshape(-1)[0]))

    def end(self) -> None:
        """Nothing to flush: the answer is assembled from the tokens already passed on, or from `generate`'s result."""


def eos_token_ids(model: DashModel) -> list[int]:
    """End-of-sequence ids of both the generation config and the tokenizer (chat models end turns with either)."""
    ids: set[int] = set()
    config = getattr(model.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    return sorted(ids)


class Worker:
    """Runs every generation on one thread, in arrival order; counts what it did for `/health`."""

    def __init__(self, model: DashModel, max_queue: int) -> None:
        self.model = model
        self.default_speedup = model.speedup
        self.max_queue = max_queue
        self.eos = eos_token_ids(model)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dashskip-generate")
        self.jobs: set[Job] = set()
        self.generated_tokens = 0
        self.cancelled = 0

    def check_room(self) -> None:
        if len(self.jobs) >= self.max_queue:
            raise APIError(
                429,
                f"server busy: {len(self.jobs)} requests queued; retry later",
                code="queue_full",
                kind="server_busy",
            )

    def submit(self, job: Job) -> asyncio.Future[Finished | None]:
        """Queue a job; the future resolves to None if the job was cancelled."""
        self.jobs.add(job)
        future = asyncio.get_running_loop().run_in_executor(self.executor, self._generate, job)
        future.add_done_callback(lambda _: self.jobs.discard(job))
        return future

    def close(self) -> None:
        """Stop every job at its next token so shutdown does not wait for long generations."""
        for job in list(self.jobs):
            job.cancel.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _generate(self, job: Job) -> Finished | None:
        model = self.model
        generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        try:
            out = model.generate(
                torch.tensor([job.ids]),
                max_new_tokens=job.max_new_tokens,
                do_sample=job.temperature > 0,
                temperature=job.temperature or 1.0,
                top_p=job.top_p,
                eos_token_id=self.eos,
                streamer=TokenStream(job, self),
                return_dict_in_generate=True,
                generator=generator,
                speedup=job.speedup,
                lossless=job.lossless,
            )
        except Cancelled:
            self.cancelled += 1
            return None
        tokens = out.sequences[0, len(job.ids) :].tolist()
        stats = out.stats()
        return Finished(
            tokens,
            "stop" if tokens and tokens[-1] in self.eos else "length",
            {
                "speedup": job.speedup,
                "compute_ratio": stats["compute_ratio"],
                "state_fractions": stats["state_fractions"],
                **({"lossless": model.last_speculative.as_dict()} if job.lossless and model.last_speculative else {}),
            },
        )


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


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


# ---------------------------------------------------------------- the service


class Service:
    """Turns validated requests into jobs for the worker and jobs into OpenAI-shaped answers."""

    def __init__(self, model: DashModel, served_name: str, limits: ServerLimits) -> None:
        if model.tokenizer is None:
            raise DashskipError("the server needs the model's tokenizer; load the model with dashskip.from_pretrained")
        self.model = model
        self.name = served_name
        self.limits = limits
        self.worker = Worker(model, limits.max_queue)
        self.context = getattr(model.config, "max_position_embeddings", None)

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(
                404,
                f"model '{name}' is not served here; this server serves '{self.name}' (see /v1/models)",
                "model",
                "model_not_found",
            )

    def check_speedup(self, speedup: float) -> None:
        """Refuse an unreachable operating point before queueing, so the client gets a 400, not a broken stream."""
        if speedup == 1.0:
            return
        if self.model.policy is None:
            raise APIError(
                400,
                f"speedup {speedup} needs a trained policy and this server has none; "
                "start it with `dashskip serve --policy FILE`, or ask for speedup 1.0",
                "speedup",
                "unsupported",
            )
        try:
            self.model.policy.bias_for(speedup)
        except DashskipError as exc:
            raise APIError(400, str(exc), "speedup", "invalid_value") from None

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
            return chat_input_ids(self.model.tokenizer, [m.as_template_input() for m in messages])
        except DashskipError as exc:
            raise APIError(400, str(exc), "messages", "invalid_value") from None

    def job(self, req: _Generation, ids: list[int], asked: int | None, default: int) -> Job:
        """Check the sampling fields against the server's limits and the model's context."""
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported; send n separate requests", "n", "unsupported")
        if not ids:
            raise APIError(400, "the prompt is empty; give at least one token", "prompt", "invalid_value")
        speedup = req.speedup if req.speedup is not None else self.worker.default_speedup
        self.check_speedup(speedup)
        check_lossless(req.lossless, speedup)
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
        return Job(ids, max_new, req.temperature, req.top_p, req.seed, speedup, req.lossless)

    async def answer(self, request: Request, req: _Generation, job: Job, chat: bool) -> Response:
        reply = Reply(chat, self.name, len(job.ids))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.worker.check_room()
        if req.stream:
            events = self._stream(reply, job, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        future = self.worker.submit(job)
        done = await self._unless_disconnected(request, future, job)
        if done is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(reply.whole(self.model.tokenizer.decode(done.tokens, skip_special_tokens=True), done))

    async def _unless_disconnected(self, request: Request, future: asyncio.Future, job: Job) -> Finished | None:
        """Wait for the job, or cancel it if the client disconnects first."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not future.done():  # the client left, or the server is stopping: nobody will read the answer
                job.cancel.set()
        return _result(future) if future.done() else None

    async def _stream(self, reply: Reply, job: Job, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events; being cancelled (the client left) sets the job's cancel flag.

        The job is queued here, not before: a response that never starts streaming never starts a job.
        """
        detok = Detokenizer(self.model.tokenizer)
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.on_token = lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token)
        try:
            future = self.worker.submit(job)
            future.add_done_callback(lambda _: tokens.put_nowait(None))  # after every token: both go through the loop
            if reply.chat:
                yield _event(reply.chunk(None, first=True))
            while (token := await tokens.get()) is not None:
                if text := detok.push(token):
                    yield _event(reply.chunk(text))
            try:
                done = _result(future)
            except APIError as exc:
                yield _event(exc.body())
                return
            if done is None:
                return
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
    except DashskipError as exc:
        raise APIError(400, str(exc)) from None
    except Exception as exc:
        log.exception("generation failed")
        raise APIError(500, f"generation failed: {exc}", kind="server_error") from None


# ---------------------------------------------------------------- the app


def create_app(model: DashModel, served_name: str, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `model` under `served_name`; `app.state.service` holds the worker and its counters."""
    service = Service(model, served_name, limits or ServerLimits())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.worker.close()

    app = FastAPI(title="dashskip", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {exc}", kind="server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        worker = service.worker
        return {
            "status": "ok",
            "model": service.name,
            "queued": len(worker.jobs),
            "generated_tokens": worker.generated_tokens,
            "cancelled": worker.cancelled,
        }

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
        job = service.job(req, service.prompt_ids(req.prompt), req.max_tokens, default=16)
        return await service.answer(request, req, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = _parse(await read_json(request, service.limits.max_body_bytes), ChatRequest)
        service.check_model(req.model)
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = service.job(req, service.chat_ids(req.messages), asked, default=service.limits.max_tokens)
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
