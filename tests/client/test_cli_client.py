"""The end-user commands (``hypereal run``, ``chat``, ``jobs``, ``balance``, ``usage``) as
subprocesses against a real server: the progress bar in a pseudo-terminal, ``--json`` for
scripts, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import wave
from pathlib import Path

from tests.client.conftest import HYPEREAL, MakeUser, Server

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def user_env(server: Server, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPEREAL_")}
    return {**env, "HYPEREAL_BASE_URL": server.url, "HYPEREAL_API_KEY": key, "COLUMNS": "120"}


def hypereal(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HYPEREAL, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def in_terminal(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run ``hypereal args`` with a pseudo-terminal as stdin, stdout and stderr; returns the
    exit status and everything it wrote, control sequences removed."""
    master, slave = pty.openpty()
    terminal_env = {**env, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    proc = subprocess.Popen(
        [HYPEREAL, *args], stdin=slave, stdout=slave, stderr=slave, env=terminal_env
    )
    os.close(slave)
    written = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not chunk:
            break
        written += chunk
    os.close(master)
    status = proc.wait(timeout=60)
    return status, ANSI.sub("", written.decode(errors="replace"))


def percentages(screen: str) -> list[int]:
    return [int(p) for p in re.findall(r"(\d+)%", screen)]


def test_run_shows_a_progress_bar_that_ends_at_100(
    server: Server, make_user: MakeUser, picture: Path, tmp_path: Path
) -> None:
    user = make_user(credits=100)
    out = tmp_path / "pan.mp4"
    status, screen = in_terminal(
        user_env(server, user.key),
        "run",
        "camera-motion-i2v",
        "-f",
        f"image={picture}",
        "-i",
        "prompt=slow pan left",
        "-i",
        "duration=5",
        "-o",
        str(out),
    )
    assert status == 0, screen
    assert "━" in screen  # the bar was drawn
    shown = percentages(screen)
    assert shown and shown[-1] == 100 and shown == sorted(shown), shown
    frames = [frame for frame in re.split(r"[\r\n]+", screen) if "%" in frame]
    assert "camera-motion-i2v" in frames[-1] and "completed" in frames[-1]
    assert "13 credits" in screen and f"saved {out}" in screen
    assert out.read_bytes()[4:8] == b"ftyp"


def test_jobs_wait_in_a_terminal(server: Server, make_user: MakeUser, picture: Path) -> None:
    user = make_user(credits=100)
    env = user_env(server, user.key)
    submitted = hypereal(
        env, "run", "relief-3d", "-f", f"image={picture}", "-i", "resolution=16", "--no-wait"
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("job_") and f"hypereal jobs wait {job_id}" in submitted.stderr
    status, screen = in_terminal(env, "jobs", "wait", job_id)
    assert status == 0, screen
    assert percentages(screen)[-1] == 100
    assert "/files/" in screen and "5 credits" in screen


def test_json_output_is_valid_json(server: Server, make_user: MakeUser, tmp_path: Path) -> None:
    user = make_user(credits=50)
    env = user_env(server, user.key)
    out = tmp_path / "speech.wav"

    ran = hypereal(
        env, "run", "audio-tts", "-i", "text=Scripts read JSON.", "--json", "-o", str(out)
    )
    assert ran.returncode == 0, ran.stderr
    job = json.loads(ran.stdout)
    assert job["status"] == "completed" and job["creditsUsed"] == 3
    assert job["savedTo"] == str(out)
    with wave.open(str(out)) as audio:
        assert audio.getnframes() > 0

    submitted = json.loads(
        hypereal(env, "run", "audio-tts", "-i", "text=Later", "--no-wait", "--json").stdout
    )
    # audio-tts answers synchronously: even --no-wait gets the finished job.
    assert submitted["status"] == "completed" and submitted["creditsUsed"] == 3
    waited = json.loads(hypereal(env, "jobs", "wait", submitted["jobId"], "--json").stdout)
    assert waited["jobId"] == submitted["jobId"] and waited["status"] == "completed"

    got = json.loads(hypereal(env, "jobs", "get", job["jobId"], "--json").stdout)
    assert got["jobId"] == job["jobId"] and got["outputUrl"] == job["outputUrl"]
    listed = json.loads(hypereal(env, "jobs", "list", "--json").stdout)
    assert [j["jobId"] for j in listed] == [submitted["jobId"], job["jobId"]]
    balance = json.loads(hypereal(env, "balance", "--json").stdout)
    assert balance["balance"] == 44
    usage = json.loads(hypereal(env, "usage", "--json", "-n", "2").stdout)
    assert [e["type"] for e in usage] == ["debit", "debit"]
    assert usage[0]["reference"] == submitted["jobId"]

    # Plain output: the number alone, and tables with whole ids.
    assert hypereal(env, "balance").stdout.strip() == "44"
    assert job["jobId"] in hypereal(env, "jobs", "list").stdout
    assert submitted["jobId"] in hypereal(env, "usage").stdout


def test_errors_are_one_line_and_a_nonzero_exit(
    server: Server, make_user: MakeUser, picture: Path
) -> None:
    user = make_user(credits=10)
    env = user_env(server, user.key)
    poor = hypereal(env, "run", "camera-motion-i2v", "-f", f"image={picture}", "-i", "duration=10")
    assert poor.returncode == 1
    assert poor.stdout == ""
    assert poor.stderr.strip().splitlines() == [
        "error: Insufficient credits: 26 required, 10 available"
    ]

    cases = [
        (["jobs", "get", "job_missing"], "Job not found"),
        (["run", "audio-tts", "-i", "speed=fast", "-i", "text=x"], "speed"),
        (["run", "camera-motion-i2v", "-f", "image=/no/such.png"], "no such file"),
        (["run", "no-such-model"], "Model not found"),
        (["run", "nano-banana-t2i", "-i", "prompt=cat"], "not available"),
    ]
    for args, message in cases:
        done = hypereal(env, *args)
        assert done.returncode in (1, 2), (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
        assert "Traceback" not in done.stderr

    no_key = hypereal({**env, "HYPEREAL_API_KEY": ""}, "balance")
    assert no_key.returncode == 2 and "HYPEREAL_API_KEY" in no_key.stderr
    revoked = hypereal({**env, "HYPEREAL_API_KEY": "ck_not_a_key"}, "balance")
    assert revoked.returncode == 1 and revoked.stderr.startswith("error: Unauthorized")
    assert hypereal(env, "balance").stdout.strip() == "10"  # nothing was charged


def test_chat_streams_a_conversation(server: Server, make_user: MakeUser) -> None:
    user = make_user(credits=50)
    env = user_env(server, user.key)
    talk = hypereal(
        env,
        "chat",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        stdin="What is the capital of France?\nAnd of Spain?\n/exit\nnever sent\n",
    )
    assert talk.returncode == 0, talk.stderr
    answers = [line for line in talk.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2
    assert talk.stderr.count("credits") == 2  # two turns, each with its cost

    one = hypereal(env, "chat", "smollm2-135m-instruct", "-m", "Hi", "--max-tokens", "4", "--json")
    assert one.returncode == 0, one.stderr
    answer = json.loads(one.stdout)
    assert answer["choices"][0]["message"]["content"] and answer["creditsUsed"] >= 2


def test_operator_and_user_commands_share_the_help() -> None:
    helped = hypereal({**os.environ, "COLUMNS": "120"}, "--help")
    assert helped.returncode == 0
    for command in ("serve", "keys", "credits", "run", "chat", "jobs", "balance", "usage"):
        assert re.search(rf"│ {command}\b", helped.stdout), command
