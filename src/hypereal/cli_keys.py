"""The per-key controls of ``hypereal keys create`` / ``keys update``: parsing the options
(``--models chat-*,audio-tts``, ``--expires 2027-01-01``, ``--daily-budget 100``; ``none``
clears one in an update) into :class:`hypereal.domain.keys.Controls`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

MAX_CREDITS = 10**12
NONE = "none"


class OptionError(ValueError):
    pass


def parse_models(value: str) -> list[str] | None:
    if value.strip().lower() == NONE:
        return None
    models = [part.strip() for part in value.split(",") if part.strip()]
    if not models or any(len(m) > 100 for m in models) or len(models) > 100:
        raise OptionError("--models must be 1 to 100 comma-separated slugs or patterns")
    return models


def parse_expires(value: str) -> datetime | None:
    if value.strip().lower() == NONE:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise OptionError(f"--expires must be an ISO-8601 date or time, not {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_budget(value: str, option: str) -> int | None:
    if value.strip().lower() == NONE:
        return None
    try:
        credits = int(value)
    except ValueError:
        raise OptionError(f"{option} must be a whole number of credits or 'none'") from None
    if not 0 <= credits <= MAX_CREDITS:
        raise OptionError(f"{option} must be between 0 and {MAX_CREDITS}")
    return credits


def controls_from_options(
    *,
    models: str | None,
    expires: str | None,
    daily_budget: str | None,
    monthly_budget: str | None,
    max_budget: str | None,
) -> dict[str, Any]:
    """The ``keys.Controls`` fields the options name (keyword arguments plus ``fields``)."""
    values: dict[str, Any] = {}
    if models is not None:
        values["models"] = parse_models(models)
    if expires is not None:
        values["expires_at"] = parse_expires(expires)
    for name, value, option in (
        ("budget_daily", daily_budget, "--daily-budget"),
        ("budget_monthly", monthly_budget, "--monthly-budget"),
        ("budget_total", max_budget, "--max-budget"),
    ):
        if value is not None:
            values[name] = parse_budget(value, option)
    return {**values, "fields": frozenset(values)}
