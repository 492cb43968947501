"""`pipeline serve MODEL`: an OpenAI-compatible HTTP API for one model, on FastAPI and uvicorn.

    GET  /v1/models             the one model served (its name: --model-name, else MODEL as given)
    POST /v1/completions        prompt (a string or a list of them) → text, n samples each; "stream": true for SSE
    POST /v1/chat/completions   messages → the chat template → the assistant's reply; "stream": true for SSE

Any OpenAI client works: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")``. Sampling takes
``max_tokens`` (``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``n``, ``stop``, ``seed``, and,
as vLLM does, ``top_k``, ``min_p`` and ``repetition_penalty`` (``extra_body=`` in the client). Streams are
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; ``stream_options.include_usage`` adds
the token counts. Errors are OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for a bad
request (a prompt that does not fit the context, ``max_tokens`` above ``--max-tokens-limit``), 413 for a body above
``--max-request-bytes``.

One model, one generation worker: requests are queued and run one at a time, so each gets exactly the completion
it would get alone. A client that disconnects mid-stream stops its generation; the next request in the queue runs.
It runs on the CPU in float32, for trying a model out and for tests. To serve on a GPU, with continuous batching:

    pipeline export MODEL OUT --format llama     # a native LlamaForCausalLM folder: no remote code
    vllm serve OUT --served-model-name my-model  # the same OpenAI API, on port 8000

(``pip install vllm`` on a machine with a CUDA GPU; the chat template ships in the exported tokenizer.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase

from pipeline.inference import (
    Completion,
    Prompt,
    Sampling,
    check_prompt_length,
    completions,
    context_length,
    encode_prompt,
    load_for_inference,
    stream,
)

__all__ = ["build_app", "serve"]

DEFAULT_MAX_TOKENS_LIMIT = 1024
DEFAULT_MAX_REQUEST_BYTES = 1_000_000
_COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_log = logging.getLogger("uvicorn.error")  # uvicorn's own logger: its lines appear with the server's


# ------------------------------------------------------------------------------------------ requests


class _APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """The fields both endpoints share; unknown fields are ignored, as OpenAI's own clients send some."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None


class _CompletionRequest(_Request):
    prompt: str | list[str]


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_ContentPart] | None = None

    def as_dict(self) -> dict[str, str]:
        if isinstance(self.content, list):
            if any(part.type != "text" for part in self.content):
                raise _APIError(400, "only text content parts are supported", "messages")
            content = "".join(part.text or "" for part in self.content)
        else:
            content = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


# Fields that would change the answer but are not implemented: refused rather than silently ignored.
_UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
                "best_of": (None, 1), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
                "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}

_Body = TypeVar("_Body", bound=_Request)


async def _read(request: Request, schema: type[_Body], limit: int) -> _Body:
    """The request body, refused (413) as soon as it passes ``limit`` bytes, parsed into ``schema`` (else 400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _APIError(413, f"the request body is {declared} bytes; this server takes at most {limit} "
                        "(--max-request-bytes)", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _APIError(413, f"the request body is over {limit} bytes, this server's limit (--max-request-bytes)",
                            code="request_too_large")
    try:
        parsed = schema.model_validate_json(bytes(body))
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise _APIError(400, f"{where}: {problem['msg']}" if where else problem["msg"], where or None) from None
    extra = parsed.model_extra or {}
    for field, defaults in _UNSUPPORTED.items():
        if field in extra and extra[field] not in defaults:
            raise _APIError(400, f"{field} is not supported by this server", field)
    return parsed


# ------------------------------------------------------------------------------------------ the app


class _Server:
    """The model, its settings and its one generation worker."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str,
                 max_tokens_limit: int) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_tokens_limit = max_tokens_limit
        self.context = context_length(model)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")  # one generation at a time

    def sampling(self, body: _Request, prompts: list[Prompt], default_max_tokens: int | None) -> Sampling:
        """The request's sampling, checked against the server's limit and every prompt against the context."""
        if body.model != self.name:
            raise _APIError(404, f"the model {body.model!r} is not served here; this server serves {self.name!r}",
                            "model", code="model_not_found")
        lengths = [len(encode_prompt(self.tokenizer, prompt)) for prompt in prompts]
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:  # as much as fits, within the limit
            room = self.context - max(lengths) if self.context else self.max_tokens_limit
            max_tokens = max(1, min(default_max_tokens or self.max_tokens_limit, self.max_tokens_limit, room))
        if max_tokens < 1:
            raise _APIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if max_tokens > self.max_tokens_limit:
            raise _APIError(400, f"max_tokens={max_tokens} is above this server's limit of {self.max_tokens_limit} "
                            "(--max-tokens-limit)", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        try:
            sampling = Sampling(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                stop=tuple(stop), seed=body.seed, num_samples=body.n)
            for length in lengths:
                check_prompt_length(length, max_tokens, self.context)
        except ValueError as error:
            raise _APIError(400, str(error)) from None
        return sampling

    async def run(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` on the generation worker, after the requests queued before it."""
        return await asyncio.wrap_future(self.worker.submit(job))

    def sse(self, prompt: Prompt, sampling: Sampling, chunk: Callable[..., dict[str, Any]], usage: bool
            ) -> StreamingResponse:
        """Stream one completion as server-sent events: ``chunk(text=..., finish_reason=...)`` per piece."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def job() -> None:
            if cancel.is_set():
                _log.info("a client left before its generation started: skipped it")
                return
            try:
                tokens = stream(self.model, self.tokenizer, prompt, sampling, cancel)
                for piece in tokens:
                    put("text", piece)
                put("end", tokens)
            except Exception as error:  # noqa: BLE001  (reported to the client in the stream)
                put("error", error)
                return
            if tokens.finish_reason == "cancelled":
                _log.info("a client left mid-stream: its generation stopped after %d of %d tokens",
                          tokens.completion_tokens, sampling.max_new_tokens)

        async def events() -> AsyncIterator[str]:
            yield _event(chunk(first=True))
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield _event(chunk(text=value))
                elif kind == "error":
                    yield _event({"error": {"message": str(value), "type": "server_error", "param": None,
                                            "code": None}})
                    break
                else:
                    reason = value.finish_reason if value.finish_reason in ("stop", "length") else "stop"
                    yield _event(chunk(finish_reason=reason))
                    if usage:
                        yield _event(chunk(usage=_usage(value.prompt_tokens, value.completion_tokens)))
                    break
            yield "data: [DONE]\n\n"

        self.worker.submit(job)
        return _CancellingStream(events(), cancel)


class _CancellingStream(StreamingResponse):
    """A stream whose generation is cancelled when the response ends for any reason, a disconnect included."""

    def __init__(self, content: AsyncIterator[str], cancel: threading.Event) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.cancel = cancel

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def build_app(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, model_name: str = "model",
              max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``model`` as ``model_name``. ``max_tokens_limit`` bounds ``max_tokens``;
    ``max_request_bytes`` the body; with ``api_key``, requests must send ``Authorization: Bearer <api_key>``."""
    if max_tokens_limit < 1 or max_request_bytes < 1:
        raise ValueError(f"max_tokens_limit and max_request_bytes must be >= 1, got {max_tokens_limit} and "
                         f"{max_request_bytes}")
    server = _Server(model.eval(), tokenizer, model_name, max_tokens_limit)
    app = FastAPI(title=f"pipeline serve: {model_name}", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(_APIError)
    async def api_error(request: Request, error: _APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _APIError(error.status_code, str(error.detail), code=str(error.status_code)).response()

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable) -> Any:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return _APIError(401, "a wrong or missing API key (Authorization: Bearer ...)",
                             kind="authentication_error", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pipeline"}]}

    @app.post("/v1/completions", response_model=None)
    async def text_completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await _read(request, _CompletionRequest, max_request_bytes)
        prompts: list[Prompt] = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise _APIError(400, "prompt is an empty list", "prompt")
        sampling = server.sampling(body, prompts, _COMPLETION_DEFAULT_MAX_TOKENS)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            _check_streamable(body, prompts)

            def chunk(text: str = "", finish_reason: str | None = None, usage: dict | None = None,
                      first: bool = False) -> dict[str, Any]:
                choices = [] if usage else [{"index": 0, "text": text, "logprobs": None,
                                             "finish_reason": finish_reason}]
                return {"id": ident, "object": "text_completion", "created": now, "model": model_name,
                        "choices": choices, **({"usage": usage} if usage else {})}

            return server.sse(prompts[0], sampling, chunk, _include_usage(body))
        results = await server.run(lambda: completions(server.model, tokenizer, prompts, sampling))
        flat = [c for per_prompt in results for c in per_prompt]
        choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(flat)]
        return JSONResponse({"id": ident, "object": "text_completion", "created": now, "model": model_name,
                             "choices": choices, "usage": _total_usage(results)})

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await _read(request, _ChatRequest, max_request_bytes)
        messages = [message.as_dict() for message in body.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise _APIError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
        sampling = server.sampling(body, [messages], None)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            _check_streamable(body, [messages])

            def chunk(text: str = "", finish_reason: str | None = None, usage: dict | None = None,
                      first: bool = False) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if first else {} if finish_reason else {"content": text}
                choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
                return {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": choices, **({"usage": usage} if usage else {})}

            return server.sse(messages, sampling, chunk, _include_usage(body))
        results = await server.run(lambda: completions(server.model, tokenizer, [messages], sampling))
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(results[0])]
        return JSONResponse({"id": ident, "object": "chat.completion", "created": now, "model": model_name,
                             "choices": choices, "usage": _total_usage(results)})

    return app


def _check_streamable(body: _Request, prompts: list[Prompt]) -> None:
    if body.n != 1 or len(prompts) != 1:
        raise _APIError(400, "stream=true takes one prompt and n=1 on this server", "stream")


def _include_usage(body: _Request) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _total_usage(results: list[list[Completion]]) -> dict[str, int]:
    prompt = sum(per_prompt[0].prompt_tokens for per_prompt in results)
    return _usage(prompt, sum(c.completion_tokens for per_prompt in results for c in per_prompt))


# ------------------------------------------------------------------------------------------ running it


def serve(model: str | Path, *, adapter: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          model_name: str | None = None, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, api_key: str | None = None) -> None:
    """Load ``model`` (and ``adapter``) and serve it on ``host:port`` until interrupted."""
    import uvicorn

    loaded, tokenizer = load_for_inference(model, adapter)
    name = model_name or str(model)
    app = build_app(loaded, tokenizer, model_name=name, max_tokens_limit=max_tokens_limit,
                    max_request_bytes=max_request_bytes, api_key=api_key)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model")
    print(f"serving {name!r} at http://{host}:{port}/v1 (OpenAI API: /v1/models, /v1/completions, "
          "/v1/chat/completions)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
