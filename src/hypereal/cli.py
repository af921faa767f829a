"""``hypereal`` command line. Operator commands on the database: serve, migrate, worker, keys,
credits, models, webhooks. End-user commands over HTTP with an API key (in
``hypereal.client.cli``): run, chat, jobs, balance, usage."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from hypereal.backends.options import BackendConfigError
from hypereal.client.cli import register as register_client_commands
from hypereal.domain import admin_actions, keys, ledger
from hypereal.domain.errors import HyperealError
from hypereal.services import Services, build_services
from hypereal.settings import Settings

app = typer.Typer(
    help="Self-hosted Hypereal API: run the server and manage it (operator commands, on the "
    "database), or use it (run, chat, jobs, balance, usage: over HTTP with HYPEREAL_API_KEY).",
    no_args_is_help=True,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Grant credits and read balances.", no_args_is_help=True)
models_app = typer.Typer(help="The model catalogue.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")
app.add_typer(models_app, name="models")
webhooks_app = typer.Typer(help="Webhook signing secrets.", no_args_is_help=True)
app.add_typer(webhooks_app, name="webhooks")

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
T = TypeVar("T")

# The admin API's bounds (ledger.MAX_GRANT for credits): checked before anything is created.
MAX_CREDITS = 10**12
MAX_RATE_LIMIT_PER_HOUR = 10**9


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` and return the exit (status 1) for the caller to raise."""
    console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


def print_table(table: Table) -> None:
    """Print ``table`` at least as wide as its unbreakable columns (ids), so that without a
    terminal (80 columns) ids are printed whole instead of cut to ``key_…``."""
    needed = Measurement.get(console, console.options.update(width=10**4), table).minimum
    if needed <= console.width:
        console.print(table)
    else:
        Console(width=needed).print(table)


def load_settings(**overrides: object) -> Settings:
    """The settings from HYPEREAL_* and the TOML file; a bad value exits with one line per
    problem (the variable, what is wrong, the value) instead of a traceback."""
    import os
    from pathlib import Path

    from pydantic import ValidationError

    config_file = os.environ.get("HYPEREAL_CONFIG")
    if config_file and not Path(config_file).is_file():
        err_console.print(f"hypereal: HYPEREAL_CONFIG names no readable file: {config_file}")
        raise typer.Exit(2)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = "HYPEREAL_" + "_".join(str(part) for part in error["loc"]).upper()
            value = error.get("input")
            shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
            err_console.print(f"hypereal: invalid setting {name}: {error['msg']}{shown}")
        raise typer.Exit(2) from None
    except (OSError, ValueError) as exc:  # an unreadable or malformed TOML file
        err_console.print(f"hypereal: could not load the settings: {exc}")
        raise typer.Exit(2) from None


def backend_config_error(exc: BackendConfigError) -> typer.Exit:
    """Print a misconfigured backend's one line (the backend, the option, the problem) and
    return the exit (status 2, as for any other invalid setting) for the caller to raise."""
    err_console.print(f"hypereal: invalid backend settings: {exc}", highlight=False)
    return typer.Exit(2)


def run(action: Callable[[Services], Awaitable[T]]) -> T:
    """Run one action against a migrated database; domain errors exit with status 1."""

    async def _main() -> T:
        services = build_services(load_settings())
        try:
            await services.migrate()
            return await action(services)
        finally:
            await services.close()

    try:
        return asyncio.run(_main())
    except BackendConfigError as exc:
        raise backend_config_error(exc) from None
    except HyperealError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from exc


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000)")] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Server processes on the port (default HYPEREAL_PROCESSES, 1); one per core "
            "serves the most. Each loads its own local models.",
        ),
    ] = None,
) -> None:
    """Start the API server (migrates the database first)."""
    import uvicorn

    from hypereal.api.http_protocol import RequestReadTimeoutProtocol, with_read_timeout
    from hypereal.app import create_app

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if processes is not None:
        overrides["processes"] = processes
    settings = load_settings(**overrides)
    try:
        application = create_app(settings) if settings.processes == 1 else None
    except BackendConfigError as exc:
        raise backend_config_error(exc) from None
    shown = "" if settings.processes == 1 else f" ({settings.processes} processes)"
    console.print(
        f"hypereal: serving on http://{settings.host}:{settings.port}{shown}", highlight=False
    )
    if not settings.public_url and settings.host in ("0.0.0.0", "::"):
        err_console.print(
            f"hypereal: media and poll URLs will use {settings.base_url()}; set "
            "HYPEREAL_PUBLIC_URL to the address clients reach this server at"
        )
    from hypereal.observability.logs import configure_logging

    # JSON lines (plain text on a terminal) with request ids; the app's one access line per
    # request (hypereal.access) replaces uvicorn's.
    configure_logging(level=settings.log_level, access=settings.access_log)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "log_config": None,
        "access_log": False,
    }
    if application is not None:
        tune_gc()
        uvicorn.run(
            application, http=with_read_timeout(settings.request_read_timeout_seconds), **options
        )
        return
    with _processes_environment(settings):
        # uvicorn starts the processes (and a new one for any that dies); each builds its app
        # with process_app() from the environment set here.
        uvicorn.run(
            f"{__name__}:process_app",
            factory=True,
            workers=settings.processes,
            http=RequestReadTimeoutProtocol,
            **options,
        )


@contextmanager
def _processes_environment(settings: Settings) -> Iterator[None]:
    """What several server processes share, made before they start: the migrated database,
    the admin key (printed once), the media signing key, the rate limiter (this process keeps
    it, unless it is Redis) and the metrics folder. Passed on in the environment."""
    import os
    import tempfile
    from pathlib import Path

    from hypereal.app import print_admin_key
    from hypereal.domain.ratelimit_shared import serving, socket_url
    from hypereal.services import bootstrap_admin

    async def prepare(services: Services) -> keys.CreatedKey | None:
        services.media_signer  # noqa: B018 - creates the key file once, for every process
        return await bootstrap_admin(services)

    try:
        created = run(prepare)
    except BackendConfigError as exc:
        raise backend_config_error(exc) from None
    if created is not None:
        print_admin_key(created.secret)
    with tempfile.TemporaryDirectory(prefix="hypereal-serve-") as folder:
        shared = Path(folder)
        env = {
            "HYPEREAL_HOST": settings.host,
            "HYPEREAL_PORT": str(settings.port),
            "PROMETHEUS_MULTIPROC_DIR": str(shared / "metrics"),
        }
        (shared / "metrics").mkdir()
        with ExitStack() as stack:
            if settings.resolved_rate_limit_storage.startswith("async+memory://"):
                socket = shared / "ratelimit.sock"
                stack.enter_context(serving(socket, settings.rate_limit_per_hour))
                env["HYPEREAL_RATE_LIMIT_STORAGE_URL"] = socket_url(socket)
            saved = {name: os.environ.get(name) for name in env}
            os.environ.update(env)
            try:
                yield
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


def process_app() -> Any:
    """The app of one of several server processes (uvicorn's factory, in each process)."""
    from hypereal.api.http_protocol import RequestReadTimeoutProtocol
    from hypereal.app import create_app
    from hypereal.observability.logs import configure_logging

    settings = load_settings()
    configure_logging(level=settings.log_level, access=settings.access_log, with_pid=True)
    # uvicorn's own access line stays off, as `serve` sets it for one process (access_log=False
    # took effect before this process configured its logging).
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False
    # uvicorn hands each process the protocol class by reference (a class made by
    # with_read_timeout cannot be pickled); its deadline is set here, before any connection.
    RequestReadTimeoutProtocol.read_timeout = settings.request_read_timeout_seconds
    try:
        application = create_app(settings)
    except BackendConfigError as exc:
        raise backend_config_error(exc) from None
    tune_gc()
    return application


# Young objects are collected every 50,000 allocations instead of 700, the middle generation
# every 20 young collections, and what exists once the server has started is frozen out of
# every collection (``gc.freeze``). A request allocates thousands of objects: with the
# defaults the collector ran several times per request, and its full collections walked
# every object the process keeps (catalogue, routes, schemas), a fifth of a chat request's
# CPU. Cycles are still collected; the bench's RSS row shows memory stays bounded.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """The garbage collector set for a long-running server or worker (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it; run on asyncio's own loop without
        return None
    return uvloop.new_event_loop


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="Jobs run at once (default HYPEREAL_WORKER_CONCURRENCY)")
    ] = None,
) -> None:
    """Run jobs from the shared queue (HYPEREAL_BROKER_URL); start one or more per machine."""
    from hypereal.engine.worker import run_worker
    from hypereal.observability.logs import configure_logging

    settings = load_settings()
    configure_logging(level=settings.log_level)
    tune_gc()
    try:
        # uvloop, as `serve` runs on (uvicorn picks it): a faster event loop for the jobs.
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run_worker(settings, build_services, concurrency=concurrency))
    except BackendConfigError as exc:
        raise backend_config_error(exc) from None
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


@webhooks_app.command("secret")
def webhooks_secret(
    account: Annotated[str, typer.Option(help="Account id")],
    rotate: Annotated[bool, typer.Option(help="Replace the secret with a new one")] = False,
) -> None:
    """Print an account's webhook signing secret (created on first use), or rotate it."""
    from hypereal.domain.webhook_secrets import webhook_secret

    if rotate:

        async def _rotate(services: Services) -> str:
            return await admin_actions.rotate_secret(services.db, None, account)

        print(run(_rotate))
    else:
        print(run(lambda s: webhook_secret(s.db, account)))


@app.command()
def migrate() -> None:
    """Apply database migrations."""

    async def _noop(_: Services) -> None:
        return None

    run(_noop)
    console.print("database is up to date")


ModelsOption = Annotated[
    str | None, typer.Option(help="Models the key may use: slugs or patterns, comma-separated")
]
ExpiresOption = Annotated[
    str | None, typer.Option(help="When the key stops working (ISO-8601, UTC unless given)")
]
DailyOption = Annotated[str | None, typer.Option(help="Credits the key may spend per UTC day")]
MonthlyOption = Annotated[str | None, typer.Option(help="Credits the key may spend per month")]
MaxOption = Annotated[str | None, typer.Option(help="Credits the key may spend in all")]


def _key_controls(**options: str | None) -> keys.Controls:
    from hypereal.cli_keys import OptionError, controls_from_options

    try:
        return keys.Controls(**controls_from_options(**options))
    except OptionError as exc:
        raise fail(str(exc)) from None


@keys_app.command("create")
def keys_create(
    credits: Annotated[int, typer.Option(help="Credits to grant a new account")] = 0,
    account: Annotated[str | None, typer.Option(help="Existing account id")] = None,
    name: Annotated[str, typer.Option(help="A label for the key")] = "",
    admin: Annotated[bool, typer.Option(help="Create an admin account")] = False,
    rate_limit: Annotated[int | None, typer.Option(help="Requests per hour")] = None,
    models: ModelsOption = None,
    expires: ExpiresOption = None,
    daily_budget: DailyOption = None,
    monthly_budget: MonthlyOption = None,
    max_budget: MaxOption = None,
) -> None:
    """Create a key (and a new account unless --account). The key is the last line printed."""
    if not 0 <= credits <= MAX_CREDITS:
        raise fail(f"--credits must be between 0 and {MAX_CREDITS}")
    if rate_limit is not None and not 1 <= rate_limit <= MAX_RATE_LIMIT_PER_HOUR:
        raise fail(f"--rate-limit must be between 1 and {MAX_RATE_LIMIT_PER_HOUR}")
    controls = _key_controls(
        models=models,
        expires=expires,
        daily_budget=daily_budget,
        monthly_budget=monthly_budget,
        max_budget=max_budget,
    )
    if rate_limit is not None:
        controls = replace(
            controls,
            rate_limit_per_hour=rate_limit,
            fields=controls.fields | {"rate_limit_per_hour"},
        )

    async def _create(services: Services) -> keys.CreatedKey:
        account_id = account
        if account_id is None:
            account_id = await admin_actions.create_account(
                services.db, None, name or "account", is_admin=admin
            )
        if credits:
            await admin_actions.grant_credits(
                services.db, None, account_id, credits, "granted with key (CLI)"
            )
        return await admin_actions.create_key(
            services.db, None, account_id, name=name, controls=controls
        )

    created = run(_create)
    console.print(f"account: {created.info.account_id}  key id: {created.info.id}", highlight=False)
    print(created.secret)


@keys_app.command("update")
def keys_update(
    key_id: str,
    models: ModelsOption = None,
    expires: ExpiresOption = None,
    daily_budget: DailyOption = None,
    monthly_budget: MonthlyOption = None,
    max_budget: MaxOption = None,
) -> None:
    """Change a key's models, expiry or budgets; 'none' clears one (e.g. --expires none)."""
    controls = _key_controls(
        models=models,
        expires=expires,
        daily_budget=daily_budget,
        monthly_budget=monthly_budget,
        max_budget=max_budget,
    )
    if not controls.fields:
        raise fail("nothing to change: give --models, --expires or a budget")

    async def _update(services: Services) -> keys.KeyInfo:
        return await admin_actions.update_key(services.db, None, key_id, controls)

    info = run(_update)
    console.print(f"updated {info.id}", highlight=False)


@keys_app.command("list")
def keys_list(
    account: Annotated[str | None, typer.Option(help="Only this account")] = None,
) -> None:
    """List keys (never their secrets)."""
    rows = run(lambda s: keys.list_keys(s.db, account))
    table = Table()
    for column in ("key id", "prefix", "account"):
        table.add_column(column, no_wrap=True)  # ids are copied to `keys revoke`: never cut
    table.add_column("name", overflow="fold")
    table.add_column("limit/h", no_wrap=True)
    table.add_column("models", overflow="fold")
    table.add_column("expires", no_wrap=True)
    table.add_column("spent/budget: day, month, total", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for k in rows:
        status = "revoked" if k.revoked_at else "expired" if k.expired else "active"
        limit = str(k.rate_limit_per_hour or "default")
        models = ",".join(k.models) if k.models is not None else "all"
        expires = k.expires_at.strftime("%Y-%m-%d %H:%M") if k.expires_at else "-"
        budgets = ", ".join(
            "-" if budget is None else f"{spent}/{budget}"
            for spent, budget in (
                (k.spent_day, k.budget_daily),
                (k.spent_month, k.budget_monthly),
                (k.spent_total, k.budget_total),
            )
        )
        table.add_row(
            k.id, k.prefix + "...", k.account_id, k.name, limit, models, expires, budgets, status
        )
    print_table(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key; it is refused from the next request on."""

    async def _revoke(services: Services) -> keys.KeyInfo:
        return await admin_actions.revoke_key(services.db, None, key_id)

    info = run(_revoke)
    console.print(f"revoked {info.id}")


@credits_app.command("grant")
def credits_grant(
    account_id: str,
    amount: int,
    description: Annotated[str, typer.Option(help="Ledger description")] = "grant (CLI)",
) -> None:
    """Add credits to an account."""
    if not 1 <= amount <= MAX_CREDITS:
        raise fail(f"amount must be between 1 and {MAX_CREDITS}")

    async def _grant(services: Services) -> ledger.Entry:
        return await admin_actions.grant_credits(services.db, None, account_id, amount, description)

    entry = run(_grant)
    console.print(f"{account_id}: +{amount}, balance {entry.balance_after}")


@credits_app.command("balance")
def credits_balance(account_id: str) -> None:
    """Print an account's balance."""
    print(run(lambda s: ledger.balance(s.db, account_id)))


@models_app.command("list")
def models_list() -> None:
    """Every model with its modality, price and whether a backend serves it here; then the
    wildcard patterns (``claude-*``), listed as such, as ``/v1/models`` lists them."""

    async def _list(services: Services) -> list[tuple[str, str, str, str]]:
        catalogue = services.catalogue
        entries = [(spec.slug, spec) for spec in catalogue.models.values()] + [
            (f"{pattern.pattern} (pattern)", pattern.spec_for(pattern.pattern))
            for pattern in catalogue.patterns
        ]
        rows = []
        for name, spec in entries:
            available, backend, _ = services.backends.availability(spec)
            state = f"yes ({backend})" if available else "no"
            rows.append((name, spec.modality, _price_text(spec), state))
        return rows

    table = Table()
    table.add_column("model", no_wrap=True)
    table.add_column("modality", no_wrap=True)
    table.add_column("price (credits)")
    table.add_column("available")
    for row in run(_list):
        table.add_row(*row)
    print_table(table)


def _price_text(spec: object) -> str:
    from hypereal.domain.catalogue import ModelSpec

    assert isinstance(spec, ModelSpec)
    if spec.pass_through is not None:
        terms = spec.pass_through
        return f"upstream's x {terms.markup} (max {terms.max_credits})"
    rule = spec.price
    if rule.kind == "fixed":
        return str(rule.credits)
    if rule.kind == "per_second":
        return f"{rule.credits_per_second}/s (min {rule.minimum})"
    return f"{rule.base_credits} + tokens"


# The operator commands above in one help panel, the end-user ones in another.
OPERATOR_PANEL = "Run and manage the server (on its database)"
for _command in app.registered_commands:
    _command.rich_help_panel = OPERATOR_PANEL
for _group in app.registered_groups:
    _group.rich_help_panel = OPERATOR_PANEL
register_client_commands(app)

if __name__ == "__main__":
    app()
