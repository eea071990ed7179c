"""An ASGI middleware for vLLM's server (``--middleware``) that keeps serve's internal base alias hidden.

On CPU the engine's own name for the bare base is an internal alias (see the launcher); the
base is served under the user's name as an all-zero LoRA. This middleware refuses requests to
the alias as an unknown model, lists the user's names (not the alias) in 404 answers, and shows
the base under the user's name in ``/v1/models``. Configured by the environment serve sets:
``PSOFT_DEPLOY_INTERNAL_NAME``, ``PSOFT_DEPLOY_BASE_NAME``, ``PSOFT_DEPLOY_SERVED_NAMES`` (JSON list).
"""

from __future__ import annotations

import json
import os


class HideInternalName:
    """Pure ASGI middleware; it buffers POST bodies (to read their ``model``) and the responses
    it rewrites (``/v1/models`` and 404s), and passes everything else through as it streams."""

    def __init__(self, app):
        self.app = app
        self.internal = os.environ["PSOFT_DEPLOY_INTERNAL_NAME"]
        self.base = os.environ["PSOFT_DEPLOY_BASE_NAME"]
        self.names = json.loads(os.environ["PSOFT_DEPLOY_SERVED_NAMES"])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST":
            body, receive = await _read_body(receive)
            if _requested_model(body) == self.internal:
                return await self._send_json(send, 404, self.not_found(self.internal))
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
                    await self._send_json(send, start["status"], self.rewritten(b"".join(chunks)),
                                          [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"])
                return
            await send(message)

        await self.app(scope, receive, rewrite)

    def not_found(self, model: str) -> dict:
        return {"error": {"message": f"The model `{model}` does not exist. Served models: {', '.join(self.names)}.",
                          "type": "NotFoundError", "param": "model", "code": 404}}

    def rewritten(self, body: bytes) -> dict | bytes:
        """A 404 naming the user's models, or the model list with the base under the user's name."""
        try:
            content = json.loads(body)
        except ValueError:
            return body
        if isinstance(content, dict) and isinstance(content.get("data"), list):
            cards = {card.get("id"): card for card in content["data"]}
            if self.internal in cards:  # the engine's base card, under the user's name, first
                base_card = cards.pop(self.internal) | {"id": self.base}
                cards.pop(self.base, None)  # the all-zero LoRA that stands for the base
                cards = {self.base: base_card, **cards}
            for card in cards.values():
                if card.get("parent") == self.internal:
                    card["parent"] = self.base
            content["data"] = list(cards.values())
            return content
        error = content.get("error") if isinstance(content, dict) else None
        if isinstance(error, dict) and "does not exist" in str(error.get("message")):
            model = str(error["message"]).split("`")[1] if "`" in str(error["message"]) else ""
            content["error"]["message"] = self.not_found(model)["error"]["message"]
        return content

    @staticmethod
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
