"""What turns cost, per resource and UTC day, and daily budgets (contract §10).

Each finished turn writes one :class:`~sessions_app.models.TurnRecord` with
its own tokens and cost (the chat app computes them; a Claude process's
totals run on across the turns it serves), in the same database trip as the
turn's last mapping save when it has one, and adds its cost to the thread's
``SessionMapping.cost_usd`` in the same transaction, only if the record was
new (a retried write counts nothing twice). Sums read the records' stored
``day``.

A resource's budget is its :class:`~sessions_app.models.ResourceBudget`
override (set in the admin; empty: no cap), else ``OMNI_DAILY_BUDGET_USD``
(0: no cap). It is checked before a turn starts, against the records of the
day so far, in the database every worker shares; the override is read at
every check (one statement with the day's spend), so a change made in the
admin applies on every worker at once.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time as dtime, timedelta
from decimal import Decimal

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Count, Sum
from django.utils import timezone

from . import sql
from .errors import BadRequest, RateLimited
from .models import ResourceBudget, TurnRecord

MAX_RANGE_DAYS = 366
DEFAULT_DAYS = 30


class BudgetExceeded(RateLimited):
    code = "budget_exceeded"

    def __init__(self, message: str, *, resets_at: datetime):
        seconds = max(1, math.ceil((resets_at - timezone.now()).total_seconds()))
        super().__init__(message, retry_after=seconds)
        self.resets_at = resets_at


def today() -> date:
    return timezone.now().astimezone(UTC).date()


def next_midnight(day: date | None = None) -> datetime:
    day = day or today()
    return datetime.combine(day + timedelta(days=1), dtime(0), tzinfo=UTC)


def money(value) -> float:
    return float(round(Decimal(value or 0), 8))


def dollars(value) -> str:
    """An amount as text with every digit it has, and at least cents:
    ``$0.002``, ``$0.00201234``, ``$5.00``, ``$12.50``."""
    amount = Decimal(str(value or 0))
    exponent = amount.normalize().as_tuple().exponent
    places = max(2, -exponent) if isinstance(exponent, int) else 2
    return f"${amount:.{places}f}"


# --- writing ---------------------------------------------------------------------------

def record_fields(record: dict) -> dict:
    """A turn's record as TurnRecord fields (its cost a Decimal, its UTC day)."""
    return {**record, "cost_usd": Decimal(str(record.get("cost_usd") or 0)),
            "day": record["started_at"].astimezone(UTC).date()}


def record_turn_sync(record: dict) -> None:
    """Write a turn's record and add its cost to its thread's total, together
    and once: a second write of the same turn changes nothing (see
    :func:`sessions_app.sql.record_turn`)."""
    sql.record_turn(record_fields(record))


async def record_turn(record: dict) -> None:
    await sync_to_async(record_turn_sync)(record)


# --- budgets ---------------------------------------------------------------------------

def _default_budget() -> Decimal:
    return Decimal(str(settings.OMNI_DAILY_BUDGET_USD or 0))


def _effective(has_override: bool, amount: Decimal | None) -> Decimal | None:
    if has_override:
        return amount if amount and amount > 0 else None
    default = _default_budget()
    return default if default > 0 else None


def budget_for_sync(resource_id: str) -> Decimal | None:
    """The resource's daily budget in USD, or None (no cap)."""
    override = ResourceBudget.objects.filter(resource_id=resource_id).values_list("daily_usd").first()
    return _effective(override is not None, override[0] if override else None)


def spent_sync(resource_id: str, day: date | None = None) -> Decimal:
    total = TurnRecord.objects.filter(resource_id=resource_id, day=day or today()).aggregate(
        total=Sum("cost_usd"))["total"]
    return total or Decimal(0)


def default_caps() -> bool:
    """``OMNI_DAILY_BUDGET_USD`` caps the resources without an override."""
    return _default_budget() > 0


def check_budget_sync(resource_id: str, state=None) -> Decimal | None:
    """Raise :class:`BudgetExceeded` if the resource spent its budget today;
    else what is left (None: no cap). One statement (the override and the
    day's spend together, :func:`sessions_app.sql.budget_state`), none when
    the caller read ``state`` already (a message reads it with its thread's
    mapping): no worker caches overrides, so one saved in the admin applies
    at the next check."""
    has_override, amount, spent = state or sql.budget_state(
        resource_id=resource_id, day=today(), default_caps=default_caps())
    budget = _effective(has_override, amount)
    if budget is None:
        return None
    if spent >= budget:
        resets = next_midnight()
        raise BudgetExceeded(
            f"resource {resource_id!r} spent its daily budget ({dollars(spent)} of {dollars(budget)}); "
            f"it resets at {resets:%Y-%m-%d %H:%M}Z", resets_at=resets)
    return budget - spent




# --- reading -----------------------------------------------------------------------------

def parse_range(start: str | None, end: str | None) -> tuple[date, date]:
    """``from``/``to`` (``YYYY-MM-DD``, inclusive, UTC); default the last 30 days."""
    try:
        to = date.fromisoformat(end) if end else today()
        frm = date.fromisoformat(start) if start else None
    except ValueError as exc:
        raise BadRequest("from and to are dates: YYYY-MM-DD") from exc
    if frm is None:
        try:
            frm = to - timedelta(days=DEFAULT_DAYS - 1)
        except OverflowError:  # before 0001-01-01
            raise BadRequest(f"the default from ({DEFAULT_DAYS - 1} days before to) is before "
                             f"{date.min.isoformat()}: give from") from None
    if frm > to:
        raise BadRequest("from is after to")
    if (to - frm).days + 1 > MAX_RANGE_DAYS:
        raise BadRequest(f"a range covers at most {MAX_RANGE_DAYS} days")
    return frm, to


def _usage(row) -> dict:
    return {"turns": row["turns"] or 0, "inputTokens": row["input"] or 0,
            "outputTokens": row["output"] or 0, "costUsd": money(row["cost"])}


SUMS = {"turns": Count("id"), "input": Sum("input_tokens"), "output": Sum("output_tokens"),
        "cost": Sum("cost_usd")}


def usage_sync(resource_id: str, frm: date, to: date) -> dict:
    records = TurnRecord.objects.filter(resource_id=resource_id, day__gte=frm, day__lte=to)
    days = [{"date": row["day"].isoformat(), **_usage(row)}
            for row in records.order_by().values("day").annotate(**SUMS).order_by("day")]
    budget = budget_for_sync(resource_id)
    return {
        "resourceId": resource_id,
        "from": frm.isoformat(),
        "to": to.isoformat(),
        "total": _usage(records.aggregate(**SUMS)),
        "days": days,
        "budget": {"dailyUsd": money(budget) if budget is not None else None,
                   "spentTodayUsd": money(spent_sync(resource_id)),
                   "resetsAt": next_midnight().isoformat().replace("+00:00", "Z")},
    }


async def usage(resource_id: str, start: str | None, end: str | None) -> dict:
    frm, to = parse_range(start, end)
    return await sync_to_async(usage_sync)(resource_id, frm, to)
