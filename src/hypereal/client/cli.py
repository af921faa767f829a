"""The end-user commands of ``hypereal`` (on :mod:`hypereal.client`): ``run``, ``chat``,
``jobs list|get|cancel|wait``, ``balance`` and ``usage``. They call a server over HTTP with
an API key (``--api-key`` / ``HYPEREAL_API_KEY``, ``--base-url`` / ``HYPEREAL_BASE_URL``);
the operator commands next to them work on the database instead.

Results go to stdout (the output URL or saved path, the answer, or JSON with ``--json``);
progress, costs and errors go to stderr. An error is one line and a non-zero exit."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hypereal.client import (
    ChatResult,
    Client,
    HyperealError,
    ImageResult,
    Job,
    LedgerEntry,
    Model,
    ModelParam,
)

PANEL = "Use the API (HYPEREAL_API_KEY)"

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

BaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        envvar="HYPEREAL_BASE_URL",
        help="Server URL (default http://127.0.0.1:8000)",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="HYPEREAL_API_KEY", help="API key (ck_...)", show_default=False
    ),
]
JobIdArgument = Annotated[str, typer.Argument(help="Job id (job_...)")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON (for scripts)")]
TimeoutOption = Annotated[
    float | None, typer.Option("--timeout", help="Seconds to wait for the job (default: no limit)")
]
OutputOption = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Save the output to this file (or directory)"),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


@contextmanager
def _handled() -> Iterator[None]:
    """Client errors as one line on stderr and exit status 1 (130 on Ctrl-C)."""
    try:
        yield
    except HyperealError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:  # saving the output
        raise _fail(
            f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
        ) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _client(base_url: str | None, api_key: str | None) -> Client:
    try:
        return Client(base_url=base_url, api_key=api_key)
    except HyperealError:
        raise _fail("no API key: pass --api-key or set HYPEREAL_API_KEY", 2) from None


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _print_table(table: Table) -> None:
    """On a terminal, at its width; else (a pipe, a file) as wide as the table needs, so
    that nothing, ids above all, is cut or folded."""
    if out.is_terminal:
        out.print(table)
        return
    needed = Measurement.get(out, out.options.update(width=10**4), table).maximum
    Console(width=max(needed, out.width), highlight=False).print(table)


# --------------------------------------------------------------------------- inputs


def _coerce(raw: str, param: ModelParam | None) -> Any:
    """``-i key=value``: typed by the model's parameter; for parameters the catalogue does
    not list, JSON when it parses (numbers, true/false, lists), else the text."""
    if param is None:
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    try:
        if param.type == "integer":
            return int(raw)
        if param.type == "number":
            return float(raw)
    except ValueError:
        raise _fail(f"-i {param.name}: expected a {param.type}, got {raw!r}", 2) from None
    if param.type == "boolean":
        lowered = raw.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise _fail(f"-i {param.name}: expected true or false, got {raw!r}", 2)
        return lowered in ("true", "1", "yes")
    return raw


def _put(values: dict[str, Any], name: str, value: Any, param: ModelParam | None) -> None:
    if (param is not None and param.type == "media-list") or name in values:
        current = values.get(name)
        items = current if isinstance(current, list) else ([] if current is None else [current])
        values[name] = [*items, value]
    else:
        values[name] = value


def _split(option: str, pair: str) -> tuple[str, str]:
    name, sep, value = pair.partition("=")
    if not sep or not name:
        raise _fail(f"{option} expects key=value, got {pair!r}", 2)
    return name, value


def parse_inputs(model: Model, inputs: list[str], files: list[str]) -> dict[str, Any]:
    """The ``-i key=value`` and ``-f key=path`` options as the model's input."""
    values: dict[str, Any] = {}
    for pair in inputs:
        name, raw = _split("-i", pair)
        param = model.param(name)
        _put(values, name, _coerce(raw, param), param)
    for pair in files:
        name, raw = _split("-f", pair)
        path = Path(raw).expanduser()
        if not path.is_file():
            raise _fail(f"-f {name}: no such file: {raw}", 2)
        _put(values, name, path, model.param(name))
    return values


# ------------------------------------------------------------------------- progress


class ProgressBar:
    """A rich progress bar on stderr fed by the job's ``progress`` and ``stage`` (shown only
    on a terminal). ``total=None`` pulses until :meth:`finish`."""

    def __init__(self, label: str, *, enabled: bool, determinate: bool = True) -> None:
        self.label = label
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not (enabled and err.is_terminal),
        )
        self.task = self.progress.add_task(label, total=100 if determinate else None)

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def update(self, job: Job) -> None:
        self.progress.update(
            self.task,
            total=100,
            completed=max(0.0, min(1.0, job.progress)) * 100,
            description=f"{escape(self.label)} [dim]{escape(job.stage)}[/dim]",
        )

    def finish(self, stage: str = "completed") -> None:
        self.progress.update(
            self.task,
            total=100,
            completed=100,
            description=f"{escape(self.label)} [dim]{escape(stage)}[/dim]",
        )
        self.progress.refresh()


# ------------------------------------------------------------------------- printing


def _report(
    model: str, result: Job | ImageResult | ChatResult, saved: Path | None, as_json: bool
) -> None:
    """stdout: the saved path, the output URL(s) or the answer (or the JSON); stderr: the
    cost."""
    if as_json:
        data = dict(result.raw)
        if saved is not None:
            data["savedTo"] = str(saved)
        _print_json(data)
        return
    if isinstance(result, ChatResult):
        if saved is None:
            out.print(result.content, markup=False)
    elif saved is None:
        for url in result.output_urls:
            out.print(url, markup=False)
    if saved is not None:
        out.print(str(saved), markup=False)
    where = f" · saved {saved}" if saved is not None else ""
    err.print(
        f"[green]✓[/green] {escape(model)} · {result.credits_used} credits{escape(where)}",
    )


def _job_row(job: Job) -> tuple[str, ...]:
    created = job.created_at.strftime("%Y-%m-%d %H:%M:%S") if job.created_at else ""
    return (
        job.id,
        job.model or "",
        job.type or "",
        job.stage,
        f"{job.progress * 100:.0f}%",
        str(job.credits_used),
        created,
    )


def _print_job(job: Job) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True, style="bold")
    table.add_column(overflow="fold")
    rows: list[tuple[str, str]] = [
        ("job", job.id),
        ("model", job.model or ""),
        ("type", job.type or ""),
        ("status", job.status if job.stage == job.status else f"{job.status} ({job.stage})"),
        ("progress", f"{job.progress * 100:.0f}%"),
        ("credits", str(job.credits_used)),
    ]
    if job.output_url:
        rows.append(("output", job.output_url))
    if job.error:
        rows.append(("error", job.error))
    if job.created_at:
        rows.append(("created", job.created_at.isoformat()))
    if job.completed_at:
        rows.append(("completed", job.completed_at.isoformat()))
    for name, value in rows:
        table.add_row(name, escape(value))
    _print_table(table)


# ------------------------------------------------------------------------- commands


def run_command(
    model: Annotated[str, typer.Argument(help="Model slug, e.g. audio-tts (see GET /v1/models)")],
    input: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="An input field: key=value (repeatable)"),
    ] = None,
    file: Annotated[
        list[str] | None,
        typer.Option("--file", "-f", help="An input file: key=path, sent inline (repeatable)"),
    ] = None,
    output: OutputOption = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Submit the job and print its id")
    ] = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Run a model: submit, follow the job with a progress bar, print or save the output.

    Example: hypereal run audio-tts -i text="Hello there" -o hello.wav
    """
    if no_wait and output is not None:
        raise _fail("--output needs the result: drop --no-wait", 2)
    client = _client(base_url, api_key)
    with client, _handled():
        spec = client.models.get(model)
        values = parse_inputs(spec, input or [], file or [])
        submitters = {"video": client.videos, "audio": client.audio, "3d": client.threed}
        submitter = submitters.get(spec.modality)
        result: Job | ImageResult | ChatResult
        if submitter is None:  # images and chat answer synchronously
            with ProgressBar(model, enabled=not as_json, determinate=False) as bar:
                result = client.run(model, values)
                bar.finish()
        else:
            job = submitter.generate(model, values)
            if no_wait:
                if as_json:
                    _print_json(dict(job.raw))
                else:
                    out.print(job.id, markup=False)
                    err.print(
                        f"submitted · {job.credits_used} credits · follow it with: "
                        f"hypereal jobs wait {job.id}"
                    )
                return
            result = _wait(client, job.id, model, timeout=timeout, as_json=as_json)
        saved = result.save(output) if output is not None else None
        _report(model, result, saved, as_json)


def _wait(client: Client, job_id: str, label: str, *, timeout: float | None, as_json: bool) -> Job:
    try:
        with ProgressBar(label, enabled=not as_json) as bar:
            job = client.jobs.wait(job_id, timeout=timeout, on_progress=bar.update)
            bar.finish()
    except KeyboardInterrupt:
        err.print(f"stopped waiting; the job goes on: hypereal jobs wait {job_id}")
        raise typer.Exit(130) from None
    return job


def chat_command(
    model: Annotated[
        str | None, typer.Argument(help="Chat model (default: the server's default)")
    ] = None,
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="Ask one question and exit")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system prompt")] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="0.0 to 2.0 (default 0.8)")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Longest answer, in tokens")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --message: print the answer as JSON")
    ] = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Chat, streaming the answers: one question with --message, else a conversation read
    line by line (type /exit or press Ctrl-D to leave)."""
    if as_json and message is None:
        raise _fail("--json needs --message", 2)
    client = _client(base_url, api_key)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    with client, _handled():
        if message is not None:
            if as_json:
                answer = client.chat(
                    [*history, {"role": "user", "content": message}],
                    model=model,
                    temperature=temperature,
                    max_tokens=max_tokens,
                )
                _print_json(dict(answer.raw))
                return
            _turn(client, history, message, model, temperature, max_tokens)
            return
        interactive = sys.stdin.isatty()
        if interactive:
            err.print(f"chatting with {escape(model or 'the default model')}; /exit to leave")
        while True:
            try:
                line = input("> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not line:
                break
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if text:
                _turn(client, history, text, model, temperature, max_tokens)


def _turn(
    client: Client,
    history: list[dict[str, str]],
    text: str,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
) -> None:
    """One streamed exchange; appends both messages to ``history``."""
    messages = [*history, {"role": "user", "content": text}]
    with client.chat(
        messages, model=model, stream=True, temperature=temperature, max_tokens=max_tokens
    ) as stream:
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    answer = stream.result
    assert answer is not None
    history[:] = [*messages, {"role": "assistant", "content": answer.content}]
    err.print(f"[dim]{answer.credits_used} credits[/dim]")


def balance_command(
    as_json: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Print your credit balance."""
    with _client(base_url, api_key) as client, _handled():
        balance = client.balance()
        if as_json:
            _print_json(dict(balance.raw))
        else:
            out.print(str(balance.balance))


def usage_command(
    limit: Annotated[int, typer.Option("--limit", "-n", help="Entries to show")] = 20,
    as_json: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Your ledger, newest first: grants, debits and refunds."""
    with _client(base_url, api_key) as client, _handled():
        entries: list[LedgerEntry] = list(client.usage(limit=max(1, limit)))
        if as_json:
            _print_json([dict(entry.raw) for entry in entries])
            return
        table = Table()
        for column in ("when", "type", "amount", "balance"):
            table.add_column(column, no_wrap=True)
        table.add_column("reference", overflow="fold")
        table.add_column("description", overflow="fold")
        for entry in entries:
            when = entry.created_at.strftime("%Y-%m-%d %H:%M:%S") if entry.created_at else ""
            table.add_row(
                when,
                entry.type,
                f"{entry.amount:+d}",
                str(entry.balance_after),
                entry.reference or "",
                escape(entry.description),
            )
        _print_table(table)


jobs_app = typer.Typer(help="Your jobs: list, show, cancel, wait.", no_args_is_help=True)


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option("--limit", "-n", help="Jobs to show")] = 20,
    type: Annotated[str | None, typer.Option("--type", help="Only video, audio or 3d jobs")] = None,
    as_json: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Your jobs, newest first."""
    with _client(base_url, api_key) as client, _handled():
        jobs = list(client.jobs.list(type=type, limit=max(1, limit)))
        if as_json:
            _print_json([dict(job.raw) for job in jobs])
            return
        table = Table()
        table.add_column("job", no_wrap=True, min_width=max((len(j.id) for j in jobs), default=3))
        for column in ("model", "type", "stage", "progress", "credits", "created"):
            table.add_column(column)
        for job in jobs:
            table.add_row(*(escape(cell) for cell in _job_row(job)))
        _print_table(table)


def _job_command(
    act: Callable[[Client, str], Job], show: Callable[[Job], object], doc: str
) -> Callable[..., None]:
    """A ``jobs`` command that does ``act`` to one job and prints the job it returns: its
    JSON with ``--json``, else ``show(job)``; ``doc`` is its help."""

    def command(
        job_id: JobIdArgument,
        as_json: JsonOption = False,
        base_url: BaseUrlOption = None,
        api_key: ApiKeyOption = None,
    ) -> None:
        with _client(base_url, api_key) as client, _handled():
            job = act(client, job_id)
            if as_json:
                _print_json(dict(job.raw))
            else:
                show(job)

    command.__doc__ = doc
    return command


jobs_app.command("get")(
    _job_command(
        lambda client, job_id: client.jobs.get(job_id),
        _print_job,
        "A job's status, progress, cost and output.",
    )
)
jobs_app.command("cancel")(
    _job_command(
        lambda client, job_id: client.jobs.cancel(job_id),
        lambda job: out.print(f"canceled {job.id}", markup=False),
        "Cancel a queued or running job; its credits are refunded.",
    )
)


@jobs_app.command("wait")
def jobs_wait(
    job_id: JobIdArgument,
    output: OutputOption = None,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Follow a job with a progress bar until it ends; print or save its output."""
    with _client(base_url, api_key) as client, _handled():
        job = _wait(client, job_id, job_id, timeout=timeout, as_json=as_json)
        saved = job.save(output) if output is not None else None
        _report(job.model or job.id, job, saved, as_json)


def register(app: typer.Typer) -> None:
    """Add the end-user commands to the ``hypereal`` app, in a help panel of their own."""
    app.command("run", rich_help_panel=PANEL)(run_command)
    app.command("chat", rich_help_panel=PANEL)(chat_command)
    app.add_typer(jobs_app, name="jobs", rich_help_panel=PANEL)
    app.command("balance", rich_help_panel=PANEL)(balance_command)
    app.command("usage", rich_help_panel=PANEL)(usage_command)
