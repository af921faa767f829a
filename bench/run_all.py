"""Run every bench scenario (each in its own process, one after another) and write
bench/RESULTS.md: the date, the machine, one table of all the figures (each row beside the
issue's goal for it, judged on this run's figures), and the goals missed.

``python -m bench.run_all [--quick] [--only 1,2,...] [--output PATH]``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    MET,
    MISSED,
    PY,
    ROOT,
    Row,
    file_creation_us,
    machine_info,
    workdir_base,
)

SCENARIOS = [
    ("1", "chat_passthrough"),
    ("2", "sse"),
    ("3", "jobs"),
    ("4", "webhooks"),
    ("5", "ledger"),
    ("6", "ratelimit"),
    ("7", "local_backends"),
]
SCENARIO_TIMEOUT = int(os.environ.get("BENCH_SCENARIO_TIMEOUT", "1200"))


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def profile_route(row: Row) -> str:
    """The ``bench.profile`` route that shows where a row's time goes ("" when none fits)."""
    if row.metric.startswith("GET /v1/credits"):
        return "credits"
    number = row.scenario.split(" ", 1)[0]
    return {"1": "chat", "2": "sse", "3": "jobs", "5": "debit"}.get(number, "")


def goal_summary(rows: list[Row]) -> list[str]:
    """The lines under the table: how many goals were met, and each missed one with the
    command that profiles it (a missed row gets a profile note saying where its time goes)."""
    judged = [r for r in rows if r.goal]
    if not judged:
        return []
    met = sum(1 for r in judged if r.met == MET)
    missed = [r for r in judged if r.met.startswith(MISSED)]
    lines = [
        f"Goals: {met} of {len(judged)} met, {len(missed)} missed, "
        f"{len(judged) - met - len(missed)} not judged in this run (n/a).",
        "",
    ]
    if missed:
        lines.append("Missed goals (each needs a profile note saying where its time goes):")
        for r in missed:
            route = profile_route(r)
            how = (
                f"`.venv/bin/python -m bench.profile {route}`"
                if route
                else "`bench/.venv/bin/py-spy record --pid <server>` while the scenario runs"
            )
            lines.append(
                f"- {cell(r.scenario)}, {cell(r.metric)}: {cell(r.hypereal)}, goal "
                f"{cell(r.goal)}; profile with {how}"
            )
        lines.append("")
    return lines


def litellm_version() -> str:
    python = BENCH_DIR / ".venv" / "bin" / "python"
    if not python.exists():
        return "not installed"
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="scenario numbers, e.g. 1,2")
    parser.add_argument(
        "--output", type=Path, help="default bench/RESULTS.md (--quick: bench/RESULTS-quick.md)"
    )
    args = parser.parse_args()
    if args.output is None:
        name = "RESULTS-quick.md" if args.quick else "RESULTS.md"
        args.output = BENCH_DIR / name
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()
    rows: list[Row] = []
    problems: list[str] = []
    durations: list[str] = []
    tmp = args.output.with_name(f"RESULTS-{os.getpid()}.tmp")
    # Every scenario's servers keep their data in one folder, chosen (and costed) once.
    base = workdir_base()
    os.environ["BENCH_WORKDIR"] = str(base)
    creation_us = min(file_creation_us(base) for _ in range(3))
    for number, module in SCENARIOS:
        if only and number not in only:
            continue
        print(f"== scenario {number}: {module}", flush=True)
        out = tmp.with_suffix(f".{number}.tmp")
        command = [PY, "-m", f"bench.{module}", "--json", str(out)]
        if args.quick:
            command.append("--quick")
        t0 = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, timeout=SCENARIO_TIMEOUT, check=False)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = -1
        durations.append(f"{number}: {time.monotonic() - t0:.0f} s")
        if out.exists():
            data = json.loads(out.read_text())
            rows += [Row(**r) for r in data["rows"]]
            problems += [f"scenario {number}: {p}" for p in data["problems"]]
            out.unlink()
        if code != 0:
            problems.append(f"scenario {number} ({module}) exited with {code}; see its output")
            if not out.exists():
                rows.append(Row(f"{number} {module}", "(failed)", f"exit {code}"))
    info = machine_info()
    lines = [
        "# Benchmark results",
        "",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Mode: {'quick (smoke)' if args.quick else 'full'}."
        f" Total time: {time.monotonic() - clock:.0f} s ({', '.join(durations)}).",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), {info['memory']} RAM, "
        f"{info['os']}, Python {info['python']}; LiteLLM {litellm_version()}. Servers' data "
        f"(SQLite files, media) under {base}: creating a file there costs {creation_us:.0f} us "
        "of CPU (the cheapest of bench/work, the temporary folder and ~/.cache; "
        "BENCH_WORKDIR overrides).",
        "",
        "Every figure is measured side by side in this one run on this machine, with the load "
        "generator, the server under test, the mock upstream and the other processes sharing "
        "its cores; compare within a row (ratios), not against other machines. The goal "
        "column holds the issue's target for the row and whether this run's figures meet it "
        "(ratio goals against LiteLLM's figure in this same run; n/a when it was not run); "
        "a missed goal or a failed expectation does not stop the run, both are listed under "
        "the table.",
        "",
        "| scenario | metric | hypereal | goal | vs goal | direct / raw | LiteLLM | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r.scenario, r.metric, r.hypereal, r.goal, r.met, r.direct, r.litellm, r.notes)
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    lines.append("")
    lines += goal_summary(rows)
    if problems:
        lines.append("Failed expectations:")
        lines += [f"- {cell(p)}" for p in problems]
    else:
        lines.append("Every expectation held (counts, chunk counts, ledger sums).")
    lines.append("")
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.output}")
    sys.exit(0)


if __name__ == "__main__":
    main()
