"""ASGI middlewares for vLLM's server (``--middleware``): serve's internal base alias kept hidden, and
prompts the model has no embedding for refused.

On CPU the engine's own name for the bare base is an internal alias (see the launcher); the
base is served under the user's name as an all-zero LoRA. This middleware refuses requests to
the alias as an unknown model, shows the base under the user's name in ``/v1/models``, and lists
in 404 answers what ``/v1/models`` lists at that moment (adapters loaded later included), never the
alias. Configured by the environment serve sets: ``PSOFT_DEPLOY_INTERNAL_NAME``, ``PSOFT_DEPLOY_BASE_NAME``.

vLLM checks prompt token ids against the larger of the tokenizer's and the model's vocabulary, so
where the tokenizer is larger, one prompt holding such an id kills the engine for every user;
`RefuseUnknownTokens` answers that request 400 instead (``PSOFT_DEPLOY_VOCAB_SIZE``).
"""

from __future__ import annotations

import asyncio
import json
import os

# The fields of a chat request that vLLM's /tokenize renders the same way.
CHAT_TOKENIZE_FIELDS = ("messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
                        "chat_template", "chat_template_kwargs", "tools", "mm_processor_kwargs")


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
        if scope["type"] != "http" or scope["method"] != "POST" or path not in ("/v1/completions",
                                                                                 "/v1/chat/completions"):
            return await self.app(scope, receive, send)
        body, receive = await _read_body(receive)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
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
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _requested_model(body: bytes):
    try:
        content = json.loads(body)
    except ValueError:
        return None
    return content.get("model") if isinstance(content, dict) else None
