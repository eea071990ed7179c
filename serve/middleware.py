"""ASGI middlewares for vLLM's server (``--middleware``): serve's internal base alias kept hidden,
prompts the model has no embedding for refused, and per-adapter metrics on ``/metrics``.

On CPU the engine's own name for the bare base is an internal alias (see the launcher); the
base is served under the user's name as an all-zero LoRA. This middleware refuses requests to
the alias as an unknown model, shows the base under the user's name in ``/v1/models``, and lists
in 404 answers what ``/v1/models`` lists at that moment (adapters loaded later included), never the
alias. Configured by the environment serve sets: ``PSOFT_DEPLOY_INTERNAL_NAME``, ``PSOFT_DEPLOY_BASE_NAME``.

vLLM checks prompt token ids against the larger of the tokenizer's and the model's vocabulary, so
where the tokenizer is larger, one prompt holding such an id kills the engine for every user;
`RefuseUnknownTokens` answers that request 400 instead (``PSOFT_DEPLOY_VOCAB_SIZE``).

`AdapterMetrics` counts requests, tokens, errors and time to first token per model name, in
prometheus_client's default registry, which vLLM's ``/metrics`` serves (one API server).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from psoft_deploy.serve.shared import CoresEntry

# The fields of a chat request that vLLM's /tokenize renders the same way.
CHAT_TOKENIZE_FIELDS = ("messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
                        "chat_template", "chat_template_kwargs", "tools", "mm_processor_kwargs")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
UNKNOWN = "(unknown)"  # the label of requests naming no registered model (labels stay bounded)
REQUESTS = Counter("psoft_deploy_requests", "Generation requests, by the model they name.", ["adapter"])
ERRORS = Counter("psoft_deploy_request_errors", "Generation requests answered with a status of 400 or more, or an "
                 "error event in their stream.", ["adapter"])
PROMPT_TOKENS = Counter("psoft_deploy_prompt_tokens", "Prompt tokens, from the answers' usage.", ["adapter"])
GENERATION_TOKENS = Counter("psoft_deploy_generation_tokens", "Generated tokens, from the answers' usage.", ["adapter"])
TIME_TO_FIRST_TOKEN = Histogram(
    "psoft_deploy_time_to_first_token_seconds", "From the request to its first generated output: the first chunk "
    "with output when streaming, the whole answer otherwise.", ["adapter"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
MODELS_REGISTERED = Gauge("psoft_deploy_models_registered", "Models a client can name now: the base and the adapters.")
ADAPTERS_REGISTERED = Gauge("psoft_deploy_adapters_registered", "Adapters registered now, by the form vLLM holds "
                            "them in: cores over the shared basis, or LoRA.", ["form"])


class HideInternalName:
    """Pure ASGI middleware; it buffers POST bodies (to read their ``model``) and the responses
    it rewrites (``/v1/models`` and 404s), and passes everything else through as it streams."""

    def __init__(self, app):
        self.app = app
        self.internal = os.environ["PSOFT_DEPLOY_INTERNAL_NAME"]
        self.base = os.environ["PSOFT_DEPLOY_BASE_NAME"]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST":
            body, receive = await _read_body(receive)
            if _requested_model(body) == self.internal:
                return await _send_json(send, 404, await self.not_found(scope, self.internal))
        start: dict = {}
        chunks: list[bytes] = []

        async def rewrite(message):
            if message["type"] == "http.response.start":
                if message["status"] == 404 or scope["path"].rstrip("/") == "/v1/models":
                    start.update(message)
                    return
            elif message["type"] == "http.response.body" and start:
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    await _send_json(send, start["status"], await self.rewritten(scope, b"".join(chunks)),
                                     [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"])
                return
            await send(message)

        await self.app(scope, receive, rewrite)

    async def not_found(self, scope, model: str) -> dict:
        """vLLM's 404 for ``model``, naming what is served now (adapters loaded since start included)."""
        status, body = await _call(self.app, scope, "/v1/models")
        listing = self.listing(json.loads(body)) if status == 200 else {}
        names = [card.get("id") for card in listing.get("data", [])] or [self.base]
        return {"error": {"message": f"The model `{model}` does not exist. Served models: {', '.join(names)}.",
                          "type": "NotFoundError", "param": "model", "code": 404}}

    def listing(self, content: dict) -> dict:
        """vLLM's model list with the base under the user's name, first, and the alias gone."""
        cards = {card.get("id"): card for card in content["data"]}
        if self.internal in cards:  # the engine's base card, under the user's name, first
            base_card = cards.pop(self.internal) | {"id": self.base}
            cards.pop(self.base, None)  # the all-zero LoRA that stands for the base
            cards = {self.base: base_card, **cards}
        for card in cards.values():
            if card.get("parent") == self.internal:
                card["parent"] = self.base
        return content | {"data": list(cards.values())}

    async def rewritten(self, scope, body: bytes) -> dict | bytes:
        """A 404 naming the user's models, or the model list with the base under the user's name."""
        try:
            content = json.loads(body)
        except ValueError:
            return body
        if isinstance(content, dict) and isinstance(content.get("data"), list):
            return self.listing(content)
        error = content.get("error") if isinstance(content, dict) else None
        if isinstance(error, dict) and "does not exist" in str(error.get("message")):
            model = str(error["message"]).split("`")[1] if "`" in str(error["message"]) else ""
            content["error"]["message"] = (await self.not_found(scope, model))["error"]["message"]
        return content


class RefuseUnknownTokens:
    """Pure ASGI middleware: a /v1/completions or /v1/chat/completions request whose prompt holds a
    token id at or above ``PSOFT_DEPLOY_VOCAB_SIZE`` gets a 400. Text prompts and chats are
    tokenized by vLLM's own /tokenize (chat template included); token-id prompts are checked as given."""

    def __init__(self, app):
        self.app = app
        self.vocab_size = int(os.environ["PSOFT_DEPLOY_VOCAB_SIZE"])

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        body, receive = await _read_body(receive)
        request = _json(body)
        if isinstance(request, dict):
            field = "prompt" if path == "/v1/completions" else "messages"
            for ids in await self._prompt_ids(scope, field, request):
                beyond = max(ids, default=-1)
                if beyond >= self.vocab_size:
                    message = (f"The {field} tokenizes to token id {beyond}, beyond the model's vocabulary of "
                               f"{self.vocab_size} tokens (the tokenizer is larger than the model).")
                    return await _send_json(send, 400, {"error": {"message": message, "type": "BadRequestError",
                                                                  "param": field, "code": 400}})
        await self.app(scope, receive, send)

    async def _prompt_ids(self, scope, field: str, request: dict) -> list[list[int]]:
        """The token ids of each prompt of the request, as vLLM would tokenize them (none where it cannot)."""
        model = request.get("model")
        if field == "messages":
            chat = {key: request[key] for key in CHAT_TOKENIZE_FIELDS if key in request}
            return [ids for ids in [await self._tokenize(scope, {"model": model, **chat})] if ids]
        prompt = request.get("prompt")
        prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        special = {"add_special_tokens": request["add_special_tokens"]} if "add_special_tokens" in request else {}
        found = []
        for one in prompts:
            if isinstance(one, str):
                one = await self._tokenize(scope, {"model": model, "prompt": one, **special})
            if isinstance(one, list) and all(isinstance(token, int) for token in one):
                found.append(one)
        return found

    async def _tokenize(self, scope, payload: dict) -> list[int] | None:
        """vLLM's /tokenize answer for ``payload``, called in-process; None where it refused."""
        status, body = await _call(self.app, scope, "/tokenize", payload)
        if status != 200:
            return None
        tokens = json.loads(body).get("tokens")
        return tokens if isinstance(tokens, list) else None


class AdapterMetrics:
    """Pure ASGI middleware: per-adapter metrics of completions and chat completions, labelled by the
    request's ``model`` (the base under the user's name; `UNKNOWN` for a name not registered when its
    answer ends), and, whenever ``/metrics`` is read, the registered models and adapters by form. A
    streamed request is asked for its usage (``stream_options.include_usage``), and the usage chunk the
    client did not ask for is taken out of its stream. Serve adds it last (outermost): it counts what
    the other middlewares and vLLM's API key check refuse too."""

    def __init__(self, app):
        self.app = app
        self.base = os.environ.get("PSOFT_DEPLOY_BASE_NAME")  # on CPU, the base is an all-zero adapter of this name
        self.internal = os.environ.get("PSOFT_DEPLOY_INTERNAL_NAME")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/")
        if path == "/metrics":
            self.count_registered(scope["app"].state.openai_serving_models)
        if scope["method"] != "POST" or path not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        body, receive = await _read_body(receive)
        request = _json(body)
        if not isinstance(request, dict) or not isinstance(request.get("model"), str):
            return await self.app(scope, receive, send)
        options = request.get("stream_options") or {}
        hide_usage = request.get("stream") is True and isinstance(options, dict) and not options.get("include_usage")
        if hide_usage:
            body = json.dumps(request | {"stream_options": options | {"include_usage": True}}).encode()
            scope = dict(scope, headers=[(name, value) for name, value in scope["headers"] if name != b"content-length"]
                         + [(b"content-length", str(len(body)).encode())])
            receive = _replaying(body, receive)
        answer = Answer(started=time.monotonic(), hide_usage=hide_usage)
        try:
            await self.app(scope, receive, lambda message: answer.observe(message, send))
        finally:
            self.record(scope["app"].state.openai_serving_models, request["model"], answer)

    def record(self, models, model: str, answer: Answer) -> None:
        registered = model != self.internal and (model in models.lora_requests or models.is_base_model(model))
        label = model if registered else UNKNOWN
        REQUESTS.labels(label).inc()
        if answer.status >= 400 or answer.failed:
            ERRORS.labels(label).inc()
        if isinstance(answer.usage, dict):
            PROMPT_TOKENS.labels(label).inc(answer.usage.get("prompt_tokens") or 0)
            GENERATION_TOKENS.labels(label).inc(answer.usage.get("completion_tokens") or 0)
        if answer.first_output is not None and answer.status < 400:
            TIME_TO_FIRST_TOKEN.labels(label).observe(answer.first_output - answer.started)

    def count_registered(self, models) -> None:
        adapters = [request.lora_path for name, request in models.lora_requests.items() if name != self.base]
        cores = sum(map(_held_as_cores, adapters))
        ADAPTERS_REGISTERED.labels("cores").set(cores)
        ADAPTERS_REGISTERED.labels("lora").set(len(adapters) - cores)
        MODELS_REGISTERED.set(len(adapters) + 1)


class Answer:
    """What `AdapterMetrics` reads of one answer as it passes: status, usage, when the first output
    came and whether its stream held an error."""

    def __init__(self, started: float, hide_usage: bool):
        self.started, self.hide_usage = started, hide_usage
        self.status, self.usage, self.first_output, self.failed = 500, None, None, False  # 500: nothing was sent
        self.streaming, self.pending, self.chunks = False, b"", []

    async def observe(self, message, send) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.streaming = dict(message["headers"]).get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body":
            more = message.get("more_body", False)
            if self.streaming:  # server-sent events, each ``data: JSON`` and a blank line
                *events, self.pending = (self.pending + message.get("body", b"")).split(b"\n\n")
                kept = [event + b"\n\n" for event in events if self.event(event)]
                message = dict(message, body=b"".join(kept) + (b"" if more else self.pending))
            else:
                self.chunks.append(message.get("body", b""))
                if not more:
                    content = _json(b"".join(self.chunks))
                    self.usage = content.get("usage") if isinstance(content, dict) else None
                    self.first_output = time.monotonic()
        await send(message)

    def event(self, event: bytes) -> bool:
        """Read one event of a stream; False for the usage chunk the client did not ask for."""
        chunk = _json(event.removeprefix(b"data: ")) if event.startswith(b"data: ") else None
        if not isinstance(chunk, dict):
            return True
        self.failed |= "error" in chunk
        if self.first_output is None and any(map(_has_output, chunk.get("choices") or [])):
            self.first_output = time.monotonic()
        if chunk.get("usage"):
            self.usage = chunk["usage"]
            return not (self.hide_usage and not chunk.get("choices"))
        return True


def _has_output(choice) -> bool:
    """Whether a streamed choice carries generated output (text, token ids, or a chat delta beyond its role)."""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return any(value for key, value in delta.items() if key != "role")
    return bool(choice.get("text") or choice.get("token_ids"))


@functools.lru_cache(maxsize=None)
def _held_as_cores(lora_path: str) -> bool:
    """Whether vLLM holds the adapter it loaded from ``lora_path`` as cores (a cache directory's form never changes)."""
    return CoresEntry(Path(lora_path)).holds_cores()


async def _call(app, scope, path: str, payload: dict | None = None) -> tuple[int, bytes]:
    """``app``'s status and body for a GET of ``path`` (a JSON POST of ``payload``), called in-process
    with the headers of the request in ``scope`` (an API key included)."""
    body = b"" if payload is None else json.dumps(payload).encode()
    headers = [(name, value) for name, value in scope.get("headers", [])
               if name.lower() not in (b"content-type", b"content-length")]
    if payload is not None:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    inner = dict(scope, method="GET" if payload is None else "POST", path=path, raw_path=path.encode(),
                 query_string=b"", headers=headers)
    delivered = False

    async def receive():
        nonlocal delivered
        if delivered:  # the client stays connected until the answer is complete
            await asyncio.Future()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    status, chunks = 0, []

    async def collect(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(inner, receive, collect)
    return status, b"".join(chunks)


async def _send_json(send, status: int, content: dict | bytes, headers=None) -> None:
    body = content if isinstance(content, bytes) else json.dumps(content).encode()
    headers = headers if headers is not None else [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive):
    """The whole request body, and a ``receive`` that replays it."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    return body, _replaying(body, receive)


def _replaying(body: bytes, receive):
    """A ``receive`` that gives ``body`` as the whole request, then what ``receive`` gives."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def _requested_model(body: bytes):
    content = _json(body)
    return content.get("model") if isinstance(content, dict) else None
