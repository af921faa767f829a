"""Per-key budgets: credits a key may spend per UTC day, per month and in all.

A debit by a key with a budget reserves against the key in the same transaction as the
account debit (``ledger.debit_op``): one conditional UPDATE of the key's counters, so that
concurrent requests never spend past the budget, exactly as the account balance never goes
below zero. A refund of such a debit gives the credits back to the period they were spent in.
"""

from __future__ import annotations

from datetime import datetime

from hypereal.domain.errors import KeyBudgetExceeded
from hypereal.store.writer import Dialect, Ops, Sql

_DAY = "CASE WHEN spent_day_of = :day THEN spent_day ELSE 0 END"
_MONTH = "CASE WHEN spent_month_of = :month THEN spent_month ELSE 0 END"

_RESERVE = (
    f"UPDATE api_keys SET spent_day = {_DAY} + :amount, spent_day_of = :day, "
    f"spent_month = {_MONTH} + :amount, spent_month_of = :month, "
    "spent_total = spent_total + :amount "
    "WHERE id = :key "
    f"AND (budget_daily IS NULL OR {_DAY} + :amount <= budget_daily) "
    f"AND (budget_monthly IS NULL OR {_MONTH} + :amount <= budget_monthly) "
    "AND (budget_total IS NULL OR spent_total + :amount <= budget_total) "
    "RETURNING spent_total"
)

_STATE = (
    f"SELECT budget_daily, budget_monthly, budget_total, {_DAY} AS day, {_MONTH} AS month, "
    "spent_total FROM api_keys WHERE id = :key"
)


def periods(moment: datetime) -> tuple[str, str]:
    """The UTC day (``YYYY-MM-DD``) and month (``YYYY-MM``) a moment falls in."""
    return moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m")


def reserve_op(_: Dialect, key_id: str, amount: int, at: datetime) -> Ops[None]:
    """Count ``amount`` against the key's budgets, or raise KeyBudgetExceeded (402) naming
    the budget it would pass, having written nothing."""
    day, month = periods(at)
    row = yield Sql.one(_RESERVE, key=key_id, amount=amount, day=day, month=month)
    if row is not None:
        return
    state = yield Sql.one(_STATE, key=key_id, day=day, month=month)
    if state is None:
        return  # no such key (deleted): nothing to hold against
    for budget, limit, spent in (
        ("total", state["budget_total"], state["spent_total"]),
        ("monthly", state["budget_monthly"], state["month"]),
        ("daily", state["budget_daily"], state["day"]),
    ):
        if limit is not None and int(spent) + amount > int(limit):
            raise KeyBudgetExceeded(budget, int(limit), int(spent), amount)
    # The budgets were changed between the two statements: try once more.
    row = yield Sql.one(_RESERVE, key=key_id, amount=amount, day=day, month=month)
    if row is None:
        raise KeyBudgetExceeded("total", int(state["budget_total"] or 0), 0, amount)


def release_op(d: Dialect, key_id: str, amount: int, spent_at: datetime) -> Ops[None]:
    """Give ``amount`` back to the key: to the day and month it was spent in, when those are
    still the key's current ones, and to its total."""
    day, month = periods(spent_at)
    g = d.greatest
    yield Sql.run(
        "UPDATE api_keys SET "
        f"spent_day = CASE WHEN spent_day_of = :day THEN {g}(spent_day - :amount, 0) "
        "ELSE spent_day END, "
        f"spent_month = CASE WHEN spent_month_of = :month THEN {g}(spent_month - :amount, 0) "
        "ELSE spent_month END, "
        f"spent_total = {g}(spent_total - :amount, 0) WHERE id = :key",
        key=key_id,
        amount=amount,
        day=day,
        month=month,
    )
