"""The README's walk-through runs as written, and what the README and docs/ point at exists.

The walk-through's shell blocks are marked in README.md with an HTML comment on the line
before the fence, which GitHub does not render:

    <!-- quickstart -->          run to completion, in order, in one working directory
    <!-- quickstart: broker -->  starts a local Kafka: replaced by the session's broker
    <!-- quickstart: worker -->  a long-running worker: started in the background, stopped
                                 with SIGINT (Ctrl-C) at the end

The blocks run with bash against the test session's broker. What the README hard-codes for
a fresh machine (broker 127.0.0.1:9092, web port 6066, the default topics) is swapped for
the session's broker, a free port and topics of this test's own, so the test can share a
broker (or an external cluster, ``STREAMREC_TEST_BROKER``) with the rest of the suite.
Everything else, flags included, runs exactly as a reader would type it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2
from confluent_kafka.admin import AdminClient

from stream.devtools.testing import free_port
from stream.kafka.config import client_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 300
BLOCK = re.compile(
    r"^<!-- quickstart(?::\s*(?P<role>\w+))?\s*-->\n```sh\n(?P<body>.*?)^```",
    re.MULTILINE | re.DOTALL,
)
README_BROKER, README_WEB = "127.0.0.1:9092", "localhost:6066"


def quickstart_blocks() -> list[tuple[str, str]]:
    """(role, shell text) of each marked block, in README order."""
    return [(m["role"] or "run", m["body"]) for m in BLOCK.finditer(README.read_text())]


def streamrec_commands(body: str) -> list[list[str]]:
    """The argument lists of the block's ``streamrec ...`` lines (continuations joined)."""
    text = body.replace("\\\n", " ")
    return [
        shlex.split(line)[1:] for line in text.splitlines() if line.strip().startswith("streamrec ")
    ]


def test_readme_is_short_and_its_quickstart_is_marked() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"
    roles = [role for role, _ in quickstart_blocks()]
    assert roles.count("broker") == 1 and roles.count("worker") == 1, roles
    assert roles.index("broker") < roles.index("worker") and roles.count("run") >= 3, roles
    assert set(roles) <= {"broker", "worker", "run"}, roles


def test_quickstart_commands_parse() -> None:
    """Every ``streamrec`` line of the walk-through is accepted by the CLI's parser, the
    broker line included (the walk-through test replaces it with the session's broker)."""
    from stream.cli.main import build_parser

    parser = build_parser()
    for role, body in quickstart_blocks():
        for argv in streamrec_commands(body):
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"README: `streamrec {shlex.join(argv)}` is refused (exit {exc})")
        if role == "broker":
            (argv,) = streamrec_commands(body)
            assert argv[0] == "broker" and f"--port {README_BROKER.split(':')[1]}" in body, body
        if role == "worker":
            (argv,) = streamrec_commands(body)
            assert argv[0] == "worker" and f"kafka://{README_BROKER}" in body, body


def _heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the Markdown headings of a file."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_paths_and_links_in_readme_and_docs_exist() -> None:
    """The files, folders and anchors the README and docs/ name are there (the layout moves
    under them: a stale path is a broken promise to the reader)."""
    repo_path = re.compile(r"(?<![\w/.-])((?:model|stream|deploy|docs|tests)/[\w./-]*)")
    missing = []
    for doc in [README, *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        for path in repo_path.findall(text):
            if not (REPO / path.rstrip(".")).exists():
                missing.append(f"{doc.name}: {path}")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file_part, _, anchor = target.partition("#")
            file = (doc.parent / file_part).resolve() if file_part else doc
            if not file.exists():
                missing.append(f"{doc.name}: link {target}")
            elif anchor and anchor not in _heading_anchors(file):
                missing.append(f"{doc.name}: anchor {target}")
    assert not missing, missing


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        name: float(value)
        for name, value in re.findall(r"^(streamrec_[a-z_]+) (\S+)$", text, re.MULTILINE)
    }


def _json_lines(text: str) -> list[dict]:
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
    return found


@pytest.mark.kafka
def test_walk_through_runs_as_written(kafka_bootstrap: str, tmp_path: Path) -> None:
    for tool in ("kcat", "curl", "bash"):
        assert shutil.which(tool), f"{tool} is not installed (`make system-deps` installs kcat)"
    tag = uuid.uuid4().hex[:8]
    clicks, recommendations = f"readme-clicks-{tag}", f"readme-recs-{tag}"
    web_port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # The worker's own names and files, through the environment variables every flag reads
    # (flags win, and the README's worker line passes none of these).
    worker_env = {
        **env,
        "STREAMREC_APP_ID": f"readme-{tag}",
        "STREAMREC_INPUT_TOPIC": clicks,
        "STREAMREC_OUTPUT_TOPIC": recommendations,
        "STREAMREC_DLQ_TOPIC": f"readme-dlq-{tag}",
        "STREAMREC_WEB_PORT": str(web_port),
        "STREAMREC_DATA_DIR": str(tmp_path / "faust"),
    }

    def localise(body: str) -> str:
        body = body.replace(README_BROKER, "@@broker@@").replace(README_WEB, "@@web@@")
        body = re.sub(r"(-t|--topic) clicks(?![\w-])", "\\1 @@clicks@@", body)
        body = re.sub(r"(-t|--topic) recommendations(?![\w-])", "\\1 @@recs@@", body)
        body = re.sub(
            r"^(streamrec replay (?!.*--topic).*)$",
            "\\1 --topic @@clicks@@",
            body,
            flags=re.MULTILINE,
        )
        leftover = re.findall(r":9092|:6066|-t clicks|-t recommendations", body)
        assert not leftover, f"the README block uses {leftover} in a form this test cannot swap"
        for placeholder, value in (
            ("broker", kafka_bootstrap),
            ("web", f"localhost:{web_port}"),
            ("clicks", clicks),
            ("recs", recommendations),
        ):
            body = body.replace(f"@@{placeholder}@@", value)
        return body

    blocks = quickstart_blocks()
    click = None
    outputs: list[str] = []
    worker: subprocess.Popen[bytes] | None = None
    worker_log = tmp_path / "worker.log"

    def log_tail() -> str:
        return worker_log.read_text()[-3000:] if worker_log.exists() else "(no worker log)"

    try:
        for role, body in blocks:
            if role == "broker":
                continue  # the session's broker stands in for it
            script = localise(body)
            if role == "worker":
                with worker_log.open("wb") as log:
                    worker = subprocess.Popen(
                        ["bash", "-c", f"exec {script.strip()}"],
                        cwd=tmp_path,
                        env=worker_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                continue
            sent = re.search(r'"session_id":"([^"]+)","item_id":"([^"]+)"', body)
            if sent:
                click = sent.groups()
            try:
                done = subprocess.run(
                    ["bash", "-e", "-o", "pipefail", "-c", script],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=90,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                pytest.fail(
                    f"README block timed out:\n{script}\nstdout: {exc.stdout!r}\n"
                    f"worker log:\n{log_tail()}"
                )
            assert done.returncode == 0, (
                f"README block failed ({done.returncode}):\n{script}\n"
                f"stdout: {done.stdout}\nstderr: {done.stderr[-3000:]}\n"
                f"worker log:\n{log_tail()}"
            )
            outputs.append(done.stdout)
        assert worker is not None and click is not None, "no worker block, or no click sent"
        stdout = "\n".join(outputs)
        objects = _json_lines(stdout)

        # The model trained in the walk-through is the one that answered.
        trained = [o for o in objects if "version" in o and "n_items" in o]
        assert trained, f"no training summary in the walk-through's output:\n{stdout[-2000:]}"
        session_id, item_id = click
        answers = [
            line.split(" ", 1)
            for line in stdout.splitlines()
            if line.startswith(f"{session_id} {{")
        ]
        assert answers, f"no recommendation for {session_id} was read back:\n{stdout[-2000:]}"
        answer = json.loads(answers[0][1])
        assert (answer["session_id"], answer["item_id"]) == (session_id, item_id)
        assert answer["model_version"] == trained[-1]["version"]
        assert len(answer["recommendations"]) == 20
        assert all(
            isinstance(r["item_id"], str) and isinstance(r["score"], float)
            for r in answer["recommendations"]
        )
        assert answer["source"]["offset"] == 0
        # kcat put the click where every other producer (and the session's state) would: by
        # murmur2, as the README tells it to; its default (CRC32) would put sess-1 elsewhere.
        topic = AdminClient(client_config(kafka_bootstrap)).list_topics(clicks, timeout=10)
        murmur2_partition = (murmur2(session_id.encode()) & 0x7FFFFFFF) % len(
            topic.topics[clicks].partitions
        )
        assert answer["source"]["partition"] == murmur2_partition

        # The metrics the walk-through shows: exactly the one click, answered.
        assert re.search(r"^streamrec_events_consumed_total 1\.0$", stdout, re.MULTILINE), stdout
        assert re.search(
            r"^streamrec_recommendations_published_total 1\.0$", stdout, re.MULTILINE
        ), stdout

        # The replayed log reaches the worker too.
        replayed = [o for o in objects if "events_sent" in o]
        assert replayed and replayed[-1]["delivery_errors"] == 0, stdout[-2000:]
        assert replayed[-1]["topic"] == clicks and replayed[-1]["events_sent"] > 0
        expected = 1 + replayed[-1]["events_sent"]
        deadline = time.monotonic() + 60
        while _metrics(web_port).get("streamrec_recommendations_published_total") != expected:
            assert time.monotonic() < deadline, (_metrics(web_port), expected, log_tail())
            time.sleep(0.5)
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGINT)  # Ctrl-C, as the README says
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
                pytest.fail(f"the worker did not stop on Ctrl-C:\n{log_tail()}")
