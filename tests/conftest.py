"""Shared fixtures: one Kafka broker per test session, and topic names that never collide.

Set ``STREAMREC_TEST_BROKER=HOST:PORT`` to run the Kafka tests against an existing cluster
instead of a local broker; tests then create uniquely named topics there and never assume
an empty cluster.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest
import torch

from stream.devtools.brokers import LocalKafka
from stream.devtools.testing import TINY

pytest_plugins = ["stream.devtools.skip_gate"]

# The same default as the CLI (see stream.cli.main): GRU4Rec's steps are small kernels, and idle
# OpenMP threads spinning against other processes made them many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address "HOST:PORT" of the Kafka cluster the tests use.

    The local broker starts only when a test first asks for this fixture (a few seconds)
    and is shared by the whole session, so tests that never touch Kafka pay nothing.
    """
    external = os.environ.get("STREAMREC_TEST_BROKER")
    if external:
        yield external
        return
    with LocalKafka(port=0, data_dir=tmp_path_factory.mktemp("kafka")) as broker:
        yield broker.bootstrap


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name unique to this test run, e.g. ``t-test-round-trip-1a2b3c4d``.

    Readable (derived from the test's name) and unique (random suffix), so tests sharing a
    session broker or an external cluster never see each other's messages. Derive further
    names from it (``f"{topic_name}-out"``, a consumer group) to keep them unique too.
    """
    readable = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-").lower()[:60]
    return f"t-{readable}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny GRU4Rec (200 synthetic items, 16 units) saved as a model directory, for the
    tests that need a model to serve rather than a good one."""
    from model.artifact import save_model
    from model.synth import SynthSpec, generate
    from model.train import train

    log = generate(SynthSpec(sessions=2000, items=200, seed=3))
    recommender, _ = train(log, TINY, seed=0, progress=False)
    path = tmp_path_factory.mktemp("models") / "small"
    save_model(recommender, path)
    return path
