"""Accounts and API keys. Keys are ``ck_<random>``; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase

from sqlalchemy import select, update

from hypereal.domain.errors import ModelNotAllowed, NotFound, Unauthorized
from hypereal.domain.ids import as_utc, new_id
from hypereal.store.db import Database
from hypereal.store.models import Account, ApiKey, utcnow
from hypereal.store.writer import Dialect, Ops, Sql, as_datetime, from_json

KEY_PREFIX = "ck_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's account, resolved by :func:`authenticate`."""

    account_id: str
    key_id: str
    is_admin: bool
    rate_limit_per_hour: int | None
    # The key's controls, checked in memory on every request: the models it may use (slugs
    # or fnmatch patterns; None = all), when it expires, and whether it has a budget (then
    # every debit also reserves against the key's budget, in the debit's transaction).
    models: tuple[str, ...] | None = None
    expires_at: datetime | None = None
    budgeted: bool = False

    def may_use(self, model: str) -> bool:
        return self.models is None or any(fnmatchcase(model, p) for p in self.models)


# The caller of the request being served, set by the auth middleware: the ledger reads it to
# record which key spent and to reserve against that key's budget.
CALLER: ContextVar[Principal | None] = ContextVar("hypereal_caller", default=None)


def check_model(model: str) -> None:
    """Raise ModelNotAllowed (403) when the calling key's allow-list does not name ``model``."""
    caller = CALLER.get()
    if caller is not None and not caller.may_use(model):
        raise ModelNotAllowed(model, caller.models or ())


@dataclass(frozen=True)
class KeyInfo:
    id: str
    account_id: str
    name: str
    prefix: str
    rate_limit_per_hour: int | None
    created_at: datetime
    revoked_at: datetime | None
    models: tuple[str, ...] | None = None
    expires_at: datetime | None = None
    budget_daily: int | None = None
    budget_monthly: int | None = None
    budget_total: int | None = None
    spent_day: int = 0
    spent_month: int = 0
    spent_total: int = 0

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and as_utc(self.expires_at) <= utcnow()


@dataclass(frozen=True)
class CreatedKey:
    info: KeyInfo
    secret: str  # shown once, never stored


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    now = utcnow()
    day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
    return KeyInfo(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        prefix=row.prefix,
        rate_limit_per_hour=row.rate_limit_per_hour,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        models=tuple(row.models) if row.models is not None else None,
        expires_at=as_utc(row.expires_at) if row.expires_at else None,
        budget_daily=row.budget_daily,
        budget_monthly=row.budget_monthly,
        budget_total=row.budget_total,
        spent_day=row.spent_day or 0 if row.spent_day_of == day else 0,
        spent_month=row.spent_month or 0 if row.spent_month_of == month else 0,
        spent_total=row.spent_total or 0,
    )


@dataclass(frozen=True)
class Controls:
    """Per-key controls to set: only the fields named in ``fields`` change (None clears)."""

    models: Sequence[str] | None = None
    expires_at: datetime | None = None
    budget_daily: int | None = None
    budget_monthly: int | None = None
    budget_total: int | None = None
    rate_limit_per_hour: int | None = None
    name: str | None = None
    fields: frozenset[str] = frozenset()

    def summary(self) -> dict[str, object]:
        """The fields named, JSON-ready (for the audit log)."""
        shown: dict[str, object] = {}
        for name in sorted(self.fields):
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = as_utc(value).isoformat()
            elif name == "models" and value is not None:
                value = list(value)
            shown[name] = value
        return shown

    def apply(self, row: ApiKey) -> dict[str, object]:
        """Set the named fields on ``row``; returns what changed (for the audit log)."""
        changed: dict[str, object] = {}
        for name in sorted(self.fields):
            value = getattr(self, name)
            if name == "models" and value is not None:
                value = list(dict.fromkeys(value))
            if name == "name":
                value = value or ""
            if name == "expires_at" and value is not None:
                value = as_utc(value).astimezone(UTC)
            setattr(row, name, value)
            changed[name] = value.isoformat() if isinstance(value, datetime) else value
        return changed


async def create_account(db: Database, name: str, *, is_admin: bool = False) -> str:
    """Create an empty account (balance 0) and return its id."""
    async with db.session.begin() as session:
        account = Account(id=new_id("acct"), name=name, is_admin=is_admin, balance=0)
        session.add(account)
    return account.id


async def account_exists(db: Database, account_id: str) -> bool:
    async with db.session() as session:
        return await session.get(Account, account_id) is not None


async def create_key(
    db: Database,
    account_id: str,
    *,
    name: str = "",
    rate_limit_per_hour: int | None = None,
    controls: Controls | None = None,
) -> CreatedKey:
    """Create a key for an existing account. Raises NotFound for an unknown account."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    async with db.session.begin() as session:
        if await session.get(Account, account_id) is None:
            raise NotFound(f"Account not found: {account_id}")
        row = ApiKey(
            id=new_id("key"),
            account_id=account_id,
            key_hash=hash_key(secret),
            prefix=secret[:10],
            name=name,
            rate_limit_per_hour=rate_limit_per_hour,
            created_at=utcnow(),
            spent_day=0,
            spent_month=0,
            spent_total=0,
        )
        if controls is not None:
            controls.apply(row)
        session.add(row)
    return CreatedKey(info=_info(row), secret=secret)


async def update_key(
    db: Database, key_id: str, controls: Controls
) -> tuple[KeyInfo, dict[str, object]]:
    """Change a key's controls (the fields ``controls`` names). Returns the key and what
    changed. Raises NotFound."""
    async with db.session.begin() as session:
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"API key not found: {key_id}")
        changed = controls.apply(row)
    return _info(row), changed


async def get_key(db: Database, key_id: str) -> KeyInfo:
    async with db.session() as session:
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"API key not found: {key_id}")
        return _info(row)


async def authenticate(db: Database, authorization: str | None) -> Principal:
    """Resolve an ``Authorization: Bearer ck_...`` header. Raises Unauthorized."""
    if not authorization:
        raise Unauthorized("Missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, raw_key = authorization.strip().partition(" ")
    raw_key = raw_key.strip()
    if scheme.lower() != "bearer" or not raw_key.startswith(KEY_PREFIX):
        raise Unauthorized("Malformed Authorization header; expected 'Bearer ck_...'")
    found = await db.read(_principal_op, hash_key(raw_key))
    if found is None:
        raise Unauthorized("Invalid API key")
    if found.revoked:
        raise Unauthorized("This API key has been revoked")
    expires_at = found.principal.expires_at
    if expires_at is not None and expires_at <= datetime.now(UTC):
        shown = expires_at.isoformat().replace("+00:00", "Z")
        raise Unauthorized(f"This API key expired at {shown}")
    return found.principal


@dataclass(frozen=True)
class _Found:
    principal: Principal
    revoked: bool


# Exactly one row (NULLs for an unknown hash), by the key_hash index on both databases (a
# LEFT JOIN onto a parenthesised join made SQLite scan every key).
PRINCIPAL_BY_HASH = (
    "SELECT k.id, k.account_id, k.key_hash, k.revoked_at, k.rate_limit_per_hour, "
    "k.models, k.expires_at, k.budget_daily, k.budget_monthly, k.budget_total, "
    "a.is_admin FROM (SELECT CAST(:digest AS TEXT) AS digest) q "
    "LEFT JOIN api_keys k ON k.key_hash = q.digest "
    "LEFT JOIN accounts a ON a.id = k.account_id"
)


def _principal_op(_: Dialect, digest: str) -> Ops[_Found | None]:
    """Every API request runs this: one indexed read by hash, no cache, so a revoked key
    fails on the very next request in every process (it costs microseconds on SQLite and one
    round trip on PostgreSQL, as much as reading a revocation counter would, and with the
    other requests' lookups of the same turn in one: a Sql.last, so exactly one row, of
    NULLs for an unknown key)."""
    row = yield Sql.last(PRINCIPAL_BY_HASH, digest=digest)
    # The index seek already matched; the compare is constant-time anyway.
    found = row["key_hash"] if row is not None else None
    if found is None or not hmac.compare_digest(found, digest):
        return None
    models = from_json(row["models"])  # a JSON null when cleared by the ORM
    return _Found(
        Principal(
            account_id=row["account_id"],
            key_id=row["id"],
            is_admin=bool(row["is_admin"]),
            rate_limit_per_hour=row["rate_limit_per_hour"],
            models=None if models is None else tuple(models),
            expires_at=as_datetime(row["expires_at"]),
            budgeted=row["budget_daily"] is not None
            or row["budget_monthly"] is not None
            or row["budget_total"] is not None,
        ),
        revoked=row["revoked_at"] is not None,
    )


async def list_keys(db: Database, account_id: str | None = None) -> list[KeyInfo]:
    """Keys of one account, or of every account when ``account_id`` is None."""
    query = select(ApiKey).order_by(ApiKey.created_at)
    if account_id is not None:
        query = query.where(ApiKey.account_id == account_id)
    async with db.session() as session:
        return [_info(row) for row in (await session.scalars(query)).all()]


async def revoke_key(db: Database, key_id: str) -> KeyInfo:
    """Revoke a key; effective on the next request. Raises NotFound."""
    async with db.session.begin() as session:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"API key not found: {key_id}")
        return _info(row)


async def set_key_rate_limit(db: Database, key_id: str, limit: int | None) -> KeyInfo:
    """Override (or with None, reset) one key's requests-per-hour limit."""
    async with db.session.begin() as session:
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"API key not found: {key_id}")
        row.rate_limit_per_hour = limit
        return _info(row)


async def has_accounts(db: Database) -> bool:
    async with db.session() as session:
        return (await session.scalar(select(Account.id).limit(1))) is not None
