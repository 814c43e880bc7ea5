"""POST /v1/moderations: OpenAI's moderation endpoint, answered by the tenant's
prompt-stage safety rules (regex and classifier models), not by an engine.

Request:  {"input": str | [str] | [{"type": "text", "text": str}, ...], "model"?: str}
Response: {"id", "model", "results": [{"flagged", "categories", "category_scores",
          "category_applied_input_types", "rules"}]}, one result per input.
"""

from __future__ import annotations

import uuid
from typing import Any

from apps.core.errors import invalid_request
from apps.core.usage import Payer
from apps.proxy.consumers import V1Consumer
from apps.proxy.validation import parse_json_object
from apps.safety.moderation import moderate

MAX_INPUTS = 128
DEFAULT_MODEL = "gateway-safety-rules"


def moderation_inputs(payload: dict[str, Any]) -> list[str]:
    value = payload.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and len(value) <= MAX_INPUTS:
        if all(isinstance(item, str) for item in value):
            return value
        if all(isinstance(item, dict) for item in value):
            # Multi-modal parts: the text ones are checked (images are not).
            return [" ".join(i["text"] for i in value if isinstance(i.get("text"), str))]
    raise invalid_request(
        f"`input` must be a string, or 1 to {MAX_INPUTS} strings or content parts.",
        param="input",
    )


class ModerationsConsumer(V1Consumer):
    async def handle(self, body: bytes) -> None:
        principal = await self.authorize()
        payload = parse_json_object(body)
        model = payload.get("model", DEFAULT_MODEL)
        if not isinstance(model, str):
            raise invalid_request("`model` must be a string.", param="model")
        results = await moderate(payer=Payer.of(principal), texts=moderation_inputs(payload))
        await self.send_json(
            200, {"id": f"modr-{uuid.uuid4().hex}", "model": model, "results": results}
        )
