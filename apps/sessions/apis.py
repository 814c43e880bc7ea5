"""Tenant REST API for chat sessions and the tenant's default system prompt (thin views)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.core.errors import ApiError
from apps.core.session_ids import InvalidSessionId, session_id_validate
from apps.sessions.models import ChatSession, Message
from apps.sessions.selectors import session_get, session_list, session_summary
from apps.sessions.services import (
    session_delete,
    session_set_system_prompt,
    tenant_set_system_prompt,
)
from apps.tenants.api_auth import TenantApiView

MAX_SYSTEM_PROMPT_CHARS = 100_000
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers instead of turning 42 into "42"."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class SystemPromptInput(serializers.Serializer):
    system_prompt = StrictCharField(
        allow_blank=True, trim_whitespace=False, max_length=MAX_SYSTEM_PROMPT_CHARS
    )


class PageInput(serializers.Serializer):
    limit = serializers.IntegerField(
        min_value=1, max_value=MAX_PAGE_SIZE, default=DEFAULT_PAGE_SIZE
    )
    offset = serializers.IntegerField(min_value=0, default=0)


class SessionOutput(serializers.ModelSerializer):
    id = serializers.CharField(source="external_id")
    message_count = serializers.IntegerField()

    class Meta:
        model = ChatSession
        fields = ["id", "system_prompt", "created_at", "last_active_at", "message_count"]


class MessageOutput(serializers.ModelSerializer):
    content = serializers.SerializerMethodField()
    pp_tokens_per_second = serializers.FloatField()
    tg_tokens_per_second = serializers.FloatField()

    class Meta:
        model = Message
        fields = [
            "position",
            "role",
            "content",
            "payload",
            "tokens",
            "model",
            "created_at",
            "prompt_tokens",
            "cached_tokens",
            "pp_tokens",
            "pp_started_at",
            "pp_finished_at",
            "tg_tokens",
            "tg_started_at",
            "tg_finished_at",
            "pp_tokens_per_second",
            "tg_tokens_per_second",
        ]

    def get_content(self, message: Message) -> Any:
        return message.payload.get("content")


class SessionDetailOutput(SessionOutput):
    messages = MessageOutput(many=True)

    class Meta(SessionOutput.Meta):
        fields = [*SessionOutput.Meta.fields, "messages"]


def _valid(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def _session_id(raw: str) -> str:
    try:
        return session_id_validate(raw, param="session_id")
    except InvalidSessionId as err:
        raise ApiError(400, str(err), param="session_id", code="invalid_session_id") from None


def _not_found(external_id: str) -> ApiError:
    # The same answer whether the id is unused or another tenant's: never reveal which.
    return ApiError(
        404, f"No session `{external_id}`.", param="session_id", code="session_not_found"
    )


class SessionListApi(TenantApiView):
    def get(self, request: Request) -> Response:
        page = _valid(PageInput, request.query_params)
        # One extra row tells whether there is a next page, without a COUNT(*).
        sessions = session_list(
            tenant_id=self.principal.tenant.pk, limit=page["limit"] + 1, offset=page["offset"]
        )
        return Response(
            {
                "object": "list",
                "data": SessionOutput(sessions[: page["limit"]], many=True).data,
                "limit": page["limit"],
                "offset": page["offset"],
                "has_more": len(sessions) > page["limit"],
            }
        )


class SessionDetailApi(TenantApiView):
    def get(self, request: Request, session_id: str) -> Response:
        external_id = _session_id(session_id)
        session = session_get(tenant_id=self.principal.tenant.pk, external_id=external_id)
        if session is None:
            raise _not_found(external_id)
        session.message_count = len(session.messages.all())
        return Response(SessionDetailOutput(session).data)

    def patch(self, request: Request, session_id: str) -> Response:
        external_id = _session_id(session_id)
        data = _valid(SystemPromptInput, request.data)
        session_set_system_prompt(
            tenant_id=self.principal.tenant.pk,
            external_id=external_id,
            system_prompt=data["system_prompt"],
        )
        session = session_summary(tenant_id=self.principal.tenant.pk, external_id=external_id)
        return Response(SessionOutput(session).data)

    def delete(self, request: Request, session_id: str) -> Response:
        external_id = _session_id(session_id)
        if not session_delete(tenant_id=self.principal.tenant.pk, external_id=external_id):
            raise _not_found(external_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class SystemPromptApi(TenantApiView):
    def get(self, request: Request) -> Response:
        return Response({"system_prompt": self.principal.tenant.system_prompt})

    def put(self, request: Request) -> Response:
        data = _valid(SystemPromptInput, request.data)
        tenant_set_system_prompt(
            tenant_id=self.principal.tenant.pk, system_prompt=data["system_prompt"]
        )
        return Response({"system_prompt": data["system_prompt"]})
