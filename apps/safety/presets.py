"""Built-in regex rules an operator can enable (admin "preset" field, or
`add_safety_rule NAME --preset KEY --stage ...`).

Lengths are bounded ({m,n}, not + or *) so every match fits the stream holdback
(SAFETY_STREAM_HOLDBACK_CHARS): a secret is never half-delivered before it is recognised.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    pattern: str
    flags: str
    action: str  # the action it suits best


PRESETS: dict[str, Preset] = {
    preset.key: preset
    for preset in (
        Preset(
            key="secrets",
            label="Credentials and secret keys",
            pattern=(
                r"AKIA[0-9A-Z]{16}"  # AWS access key id
                r"|sk-[A-Za-z0-9_-]{20,60}"  # OpenAI-style keys (this gateway's too)
                r"|gh[pousr]_[A-Za-z0-9]{36}"  # GitHub tokens
                r"|xox[abprs]-[A-Za-z0-9-]{10,48}"  # Slack tokens
                r"|-----BEGIN (?:[A-Z]{2,10} )?PRIVATE KEY-----"
                r"|(?i:\b(?:api[_-]?key|secret|password|passwd)\s*[:=]\s*[^\s\"']{8,40})"
            ),
            flags="",
            action="redact",
        ),
        Preset(
            key="emails",
            label="E-mail addresses",
            pattern=r"[A-Za-z0-9._%+-]{1,40}@[A-Za-z0-9-]{1,40}(?:\.[A-Za-z0-9-]{1,20}){0,3}\.[A-Za-z]{2,12}",
            flags="",
            action="redact",
        ),
        Preset(
            key="phones",
            label="Phone numbers",
            # International (+CC ...) or North-American (555) 123-4567 / 555-123-4567 forms;
            # dates such as 2026-12-03 are not phone numbers.
            pattern=(
                r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
                r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
                r"|\b\d{3}[.-]\d{3}[.-]\d{4}\b"
            ),
            flags="",
            action="redact",
        ),
        Preset(
            key="prompt_injection",
            label="Obvious prompt-injection phrases",
            pattern=(
                r"\b(?:ignore|disregard|forget)\s{1,3}(?:all\s{1,3}|any\s{1,3})?(?:the\s{1,3})?"
                r"(?:previous|prior|above|earlier|preceding)\s{1,3}"
                r"(?:instructions|prompts?|rules|directions|messages)"
                r"|\b(?:reveal|print|show|repeat)\s{1,3}(?:me\s{1,3})?(?:your|the)\s{1,3}"
                r"(?:system|hidden|initial)\s{1,3}(?:prompt|instructions)"
                r"|\byou\s{1,3}are\s{1,3}now\s{1,3}(?:DAN|in\s{1,3}developer\s{1,3}mode)\b"
            ),
            flags="i",
            action="block",
        ),
    )
}
