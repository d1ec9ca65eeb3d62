"""The callback request the mail and outbox tests start from, with fields to override."""

from __future__ import annotations

from datetime import datetime, timezone

from calmline.callback.outbox import CallbackRequest

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
CALLER = "bob@example.com"


def make_request(key: str = "1714564800.17", **overrides) -> CallbackRequest:
    fields = dict(
        key=key,
        created_at=T0,
        caller_number="+15550100",
        caller_name="Bob Example",
        caller_email=CALLER,
        agent="PJSIP/2001",
        warnings=2,
        reason="abusive caller: call ended by agent",
        uniqueid="1714564800.17",
        linkedid=key,
        channel="PJSIP/trunk-00000011",
    )
    fields.update(overrides)
    return CallbackRequest(**fields)
