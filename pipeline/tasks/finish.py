"""What an answer's finish reason says: withheld (blocked), cut short (truncated), or answered.

Apart from answers.py (the answer text's reading, which needs the mask maths: numpy, Pillow) so
that `tasks.read_answer` and the task registry load without them (a config's import, which
every `pipeline` command makes, `--help` included).
"""

from __future__ import annotations

from pipeline.rowtypes import Parsed

BLOCKED_REASONS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
        "JAILBREAK",
        "LANGUAGE",
        "ESCALATION",
        "CONTENT_BLOCKED",  # Interactions' code, upper-cased by the client
    }
)
# Cut short: the output limit, or the service's per-request decode limit when the client could
# not continue the answer to its end (pipeline/gemini: continuation).
TRUNCATED_REASONS = frozenset({"MAX_TOKENS", "CONTINUATION"})
# Ended without a usable answer for a reason the model states; a parse failure then says so.
ANSWERED = frozenset({"STOP", ""})


def finish_status(finish_reason: str | None) -> Parsed | None:
    """A "blocked" result when the finish reason says the answer was withheld, else None."""
    reason = (finish_reason or "").strip().upper()
    if reason in BLOCKED_REASONS:
        return Parsed(status="blocked", error=f"answer blocked (finish reason {reason})")
    return None


def is_truncated(finish_reason: str | None) -> bool:
    return (finish_reason or "").strip().upper() in TRUNCATED_REASONS
