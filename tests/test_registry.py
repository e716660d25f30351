"""The model registry: atomic publish, crash leftovers, retention, rollback, CLI, announcements."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from model.artifact import load_model, save_model
from model.errors import UserError
from model.inference import Recommender
from model.synth import SynthSpec, generate
from model.train import train
from stream import registry as registry_module
from stream.cli import model as model_cli
from stream.devtools.testing import (
    REPO,
    TINY,
    StreamNames,
    WorkerProcess,
    free_port,
    http_get,
    read_topic,
)
from stream.kafka.announcer import KafkaAnnouncer
from stream.registry import ModelRegistry


@pytest.fixture(scope="module")
def trained() -> Recommender:
    recommender, _ = train(
        generate(SynthSpec(sessions=300, items=40, seed=1)), TINY, progress=False
    )
    return recommender


def leftovers(root: Path) -> list[str]:
    """Names a killed writer could leave behind."""
    return sorted(
        p.name
        for p in [*root.iterdir(), *(root / "versions").iterdir()]
        if ".tmp-" in p.name or ".deleting-" in p.name
    )


def same_weights(a: Recommender, b: Recommender) -> bool:
    return all(
        torch.equal(a.network.state_dict()[name], tensor)
        for name, tensor in b.network.state_dict().items()
    )


def test_publish_makes_a_verified_version_current(tmp_path: Path, trained: Recommender) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    assert registry.current_version() is None
    with pytest.raises(UserError, match="empty registry"):
        registry.current()
    version = registry.publish(trained, training={"why": "test"}, metrics={"recall@20": 0.5})
    assert ModelRegistry.is_registry(registry.root)
    assert (registry.root / "CURRENT").read_text() == version + "\n"
    assert version.startswith("000001-")
    loaded = registry.current()
    assert loaded.version == version and same_weights(loaded, trained)
    assert loaded.metadata["metrics"] == {"recall@20": 0.5}
    assert [v.version for v in registry.list_versions()] == [version]
    assert registry.list_versions()[0].current
    assert leftovers(registry.root) == []


def test_versions_keep_the_optimizer_state_for_the_trainer(
    tmp_path: Path, trained: Recommender
) -> None:
    assert trained.optimizer_state is not None
    registry = ModelRegistry(tmp_path / "reg")
    registry.publish(trained)
    resumable = registry.current(optimizer_state=True)
    for name, value in trained.optimizer_state.items():
        assert torch.equal(resumable.optimizer_state[name], value), name
    assert registry.current().optimizer_state is None  # workers do not load it
    # an offline model imported with `streamrec model publish` keeps it too
    model_dir = save_model(trained, tmp_path / "offline")
    imported = registry.publish_directory(model_dir)
    assert registry.load(imported, optimizer_state=True).optimizer_state is not None


def test_versions_are_ordered_by_publish_even_within_one_second(
    tmp_path: Path, trained: Recommender
) -> None:
    registry = ModelRegistry(tmp_path / "reg", keep=10)
    published = [registry.publish(trained) for _ in range(4)]
    assert [v.version for v in registry.list_versions()] == published
    assert [int(v.split("-")[0]) for v in published] == [1, 2, 3, 4]


def test_leftovers_of_a_killed_publish_are_never_loaded_and_are_swept(
    tmp_path: Path, trained: Recommender
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    first = registry.publish(trained)
    # What a publish killed mid-save leaves: a staging dir holding a complete-looking copy
    # of the next version, and a pointer temp file cut off mid-write.
    staging = registry.versions_dir / ".000002-v20990101T000000-abcdef.tmp-0123abcd"
    save_model(trained, tmp_path / "elsewhere", version="000002-v20990101T000000-abcdef")
    (tmp_path / "elsewhere").rename(staging)
    (registry.root / "CURRENT.tmp-deadbeef").write_text("000002-v2099")
    assert registry.current_version() == first
    assert registry.current().version == first
    assert [v.version for v in registry.list_versions()] == [first]
    with pytest.raises(UserError, match="staging"):
        load_model(staging)
    second = registry.publish(trained)
    assert second.startswith("000002-") and registry.current().version == second
    assert leftovers(registry.root) == []


KILLED_AT_POINTER_MOVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from model.artifact import load_model
    from stream import registry as module

    def die(*args):
        os.kill(os.getpid(), signal.SIGKILL)

    reg = module.ModelRegistry(sys.argv[2])
    model = reg.current()
    module.os.replace = die   # killed after the temp pointer is written and fsynced
    reg.publish(model)
    print("not killed")
""")


def test_publish_killed_before_the_pointer_moves_keeps_the_old_version_current(
    tmp_path: Path, trained: Recommender
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    first = registry.publish(trained)
    done = subprocess.run(
        [sys.executable, "-c", KILLED_AT_POINTER_MOVE, str(REPO), str(registry.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, done.stderr
    assert registry.current_version() == first
    assert leftovers(registry.root)[0].startswith("CURRENT.tmp-")
    # The complete, verified version it wrote is listed but not current.
    listed = registry.list_versions()
    assert [v.current for v in listed] == [True, False]
    third = registry.publish(trained)
    assert third.startswith("000003-") and leftovers(registry.root) == []


def test_a_version_that_fails_verification_is_not_published(
    tmp_path: Path, trained: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    first = registry.publish(trained)
    real_save = registry_module.save_model

    def corrupting_save(*args: object, **kwargs: object) -> Path:
        path = real_save(*args, **kwargs)
        weights = path / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        return path

    monkeypatch.setattr(registry_module, "save_model", corrupting_save)
    with pytest.raises(UserError, match="checksum"):
        registry.publish(trained)
    assert registry.current_version() == first
    assert [v.version for v in registry.list_versions()] == [first]


def test_retention_keeps_the_last_k_and_never_the_current(
    tmp_path: Path, trained: Recommender
) -> None:
    registry = ModelRegistry(tmp_path / "reg", keep=2)
    published = [registry.publish(trained) for _ in range(3)]
    assert [v.version for v in registry.list_versions()] == published[1:]
    assert not registry.path_of(published[0]).exists()
    # Roll back to the older retained one, then apply a stricter retention.
    assert registry.rollback() == published[1]
    strict = ModelRegistry(registry.root, keep=1)
    assert strict.prune() == []  # published[2] is the newest, published[1] is current
    assert [v.version for v in strict.list_versions()] == published[1:]
    assert strict.current_version() == published[1]
    fourth = strict.publish(trained)
    assert [v.version for v in strict.list_versions()] == [fourth]
    assert leftovers(registry.root) == []


def test_rollback_moves_to_the_previous_retained_version(
    tmp_path: Path, trained: Recommender
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    with pytest.raises(UserError, match="not a model registry"):
        registry.rollback()
    assert not registry.root.exists()  # only publish creates a registry
    first, second, third = (registry.publish(trained) for _ in range(3))
    assert registry.rollback() == second
    assert registry.current().version == second
    assert registry.rollback() == first
    with pytest.raises(UserError, match="nothing to roll back to"):
        registry.rollback()
    assert registry.current_version() == first
    registry.publish(trained)  # a publish after rollbacks becomes the newest
    assert registry.rollback() == first  # the version served before it, not ``third``


def test_rollback_follows_the_served_history_not_the_publish_order(
    tmp_path: Path, trained: Recommender, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = ModelRegistry(tmp_path / "reg", keep=2)
    v1, v2 = registry.publish(trained), registry.publish(trained)
    assert registry.rollback() == v1
    v3 = registry.publish(trained)
    # keep=2 retains the last two published (v2, v3) and the last two served (v1, v3)
    assert [v.version for v in registry.list_versions()] == [v1, v2, v3]
    assert ModelRegistry(registry.root).served_history() == [v1, v3]  # read back from disk
    listing = model_command(capsys, "list", "--registry", str(registry.root))
    assert listing["current"] == v3 and listing["history"] == [v1, v3]
    assert registry.rollback() == v1  # not v2: it was rolled away from
    with pytest.raises(UserError, match="nothing to roll back to"):
        registry.rollback()
    assert registry.served_history() == [v1] and registry.current_version() == v1


def test_a_pointer_moved_outside_the_registry_is_part_of_the_history(
    tmp_path: Path, trained: Recommender
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    v1, v2, v3 = (registry.publish(trained) for _ in range(3))
    (registry.root / "CURRENT").write_text(v1 + "\n")  # by hand, or a crash before HISTORY
    assert registry.served_history() == [v1]
    (registry.root / "CURRENT").write_text(v2 + "\n")
    assert registry.served_history() == [v1, v2]
    assert registry.rollback() == v1
    (registry.root / "HISTORY").unlink()  # a registry written before HISTORY existed
    (registry.root / "CURRENT").write_text(v3 + "\n")
    assert registry.served_history() == [v1, v2, v3]  # publish order up to CURRENT
    assert registry.rollback() == v2


def corrupt(registry: ModelRegistry, version: str) -> None:
    """Damage a retained version's weights after it was verified (bad checksum)."""
    weights = registry.path_of(version) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


def test_a_corrupt_current_version_falls_back_to_the_newest_verified_one_served(
    tmp_path: Path, trained: Recommender, caplog: pytest.LogCaptureFixture
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    v1 = registry.publish(trained)
    registry.publish(trained)  # v2, rolled away from at once
    assert registry.rollback() == v1
    v3, v4 = registry.publish(trained), registry.publish(trained)  # served: v1, v3, v4
    corrupt(registry, v4)
    with caplog.at_level("WARNING", logger="streamrec.registry"):
        assert registry.current().version == v3
    assert registry.refused.keys() == {v4} and "checksum" in registry.refused[v4]
    corrupt(registry, v3)
    with caplog.at_level("WARNING", logger="streamrec.registry"):
        assert ModelRegistry(registry.root).current().version == v1  # not v2: rolled away
    skipped = [r.getMessage() for r in caplog.records if "skipped model" in r.getMessage()]
    assert len(skipped) == 3, skipped  # one line per refused version, with its reason
    assert all("checksum mismatch" in line for line in skipped)
    assert [line.split()[2] for line in skipped] == [v4, v4, v3]
    corrupt(registry, v1)
    with pytest.raises(UserError, match=f"no version of the served history.*{v1}.*checksum"):
        ModelRegistry(registry.root).current()
    assert registry.current_version() == v4  # loading never moves the pointer


def test_a_worker_starts_on_the_newest_verified_version(
    tmp_path: Path, trained: Recommender
) -> None:
    """``streamrec worker --model REGISTRY`` whose CURRENT is corrupt: it serves v1 (seen
    on /metrics while it waits for a broker that is not there) instead of exiting."""
    registry = ModelRegistry(tmp_path / "reg")
    v1, v2 = registry.publish(trained), registry.publish(trained)
    corrupt(registry, v2)
    port = free_port()
    worker = WorkerProcess(
        f"127.0.0.1:{free_port()}",  # nothing listens: the worker waits, serving /metrics
        registry.root,
        StreamNames("fallback"),
        tmp_path,
        "--web-port",
        str(port),
    )
    with worker:
        deadline = time.monotonic() + 90
        while f'streamrec_model_info{{model_version="{v1}"}} 1.0' not in metrics(port):
            worker.check_alive()
            assert time.monotonic() < deadline, worker.log()[-2000:]
            time.sleep(0.5)
        skipped = [line for line in worker.log().splitlines() if "skipped model" in line]
        assert len(skipped) == 1 and v2 in skipped[0] and "checksum" in skipped[0]


def metrics(port: int) -> str:
    try:
        return http_get(f"http://127.0.0.1:{port}/metrics")[1]
    except OSError:  # not serving yet
        return ""


def test_every_file_is_fsynced_before_the_pointer_moves(
    tmp_path: Path, trained: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    registry.publish(trained)
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def moved(real: Any, kind: str) -> Any:
        def move(source: Any, target: Any) -> None:
            events.append((kind, os.path.realpath(target)))
            events.append((f"{kind}d from", os.path.realpath(source)))
            real(source, target)

        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", moved(real_rename, "rename"))
    monkeypatch.setattr(os, "replace", moved(real_replace, "replace"))
    version = registry.publish(trained)
    root = registry.root.resolve()
    target = str(registry.path_of(version).resolve())
    renamed = events.index(("rename", target))
    staging = events[renamed + 1][1]
    pointer = events.index(("replace", str(root / "CURRENT")))
    assert events.index(("fsync", str(root / "versions"))) in range(renamed, pointer)
    for name in os.listdir(target):  # each file, then the directory, before the rename
        assert events.index(("fsync", f"{staging}/{name}")) < renamed, name
    assert events.index(("fsync", staging)) < renamed
    history = events.index(("replace", str(root / "HISTORY")))
    for moved_at in (pointer, history):  # each temp file fsynced, then the directory
        assert events.index(("fsync", events[moved_at + 1][1])) < moved_at
        assert ("fsync", str(root)) in events[moved_at:]


def test_rollback_refuses_a_broken_target(tmp_path: Path, trained: Recommender) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    first, second = registry.publish(trained), registry.publish(trained)
    (registry.path_of(first) / "items.json").write_text("[]")
    with pytest.raises(UserError, match="checksum"):
        registry.rollback()
    assert registry.current_version() == second


@pytest.mark.parametrize("content", ["../../etc/passwd", "", ".hidden", "a b"])
def test_a_bad_pointer_is_an_error_not_a_path(
    tmp_path: Path, trained: Recommender, content: str
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    registry.publish(trained)
    (registry.root / "CURRENT").write_text(content)
    with pytest.raises(UserError, match="not a version id"):
        registry.current()


def test_a_directory_renamed_into_versions_is_refused(tmp_path: Path, trained: Recommender) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    version = registry.publish(trained)
    impostor = registry.versions_dir / "000009-vimpostor"
    registry.path_of(version).rename(impostor)
    with pytest.raises(UserError, match="artifact says version"):
        registry.load("000009-vimpostor")


# --- streamrec model ... ------------------------------------------------------------------


def run_model_command(*argv: str) -> int:
    """Parse and run ``streamrec model ...`` as stream.cli.main.main does (errors raise)."""
    parser = argparse.ArgumentParser(prog="streamrec")
    model_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", *argv])
    return int(args.run(args))


def model_command(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """The JSON result (last stdout line) of a successful ``streamrec model ...``."""
    assert run_model_command(*argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_model_cli_publish_list_rollback(
    tmp_path: Path, trained: Recommender, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "offline"
    save_model(trained, model_dir, training={"epochs": 1})
    reg = str(tmp_path / "reg")
    first = model_command(capsys, "publish", "--registry", reg, "--model", str(model_dir))
    assert first["retained"] == [first["version"]]
    second = model_command(
        capsys, "publish", "--registry", reg, "--model", str(model_dir), "--keep", "2"
    )
    imported = load_model(second["path"])
    assert imported.metadata["training"]["imported_version"] == trained.version
    assert same_weights(imported, trained)
    listing = model_command(capsys, "list", "--registry", reg)
    assert listing["current"] == second["version"]
    assert [(v["version"], v["current"]) for v in listing["versions"]] == [
        (first["version"], False),
        (second["version"], True),
    ]
    rolled = model_command(capsys, "rollback", "--registry", reg)
    assert rolled == {
        "registry": reg,
        "version": first["version"],
        "previous": second["version"],
        "path": first["path"],
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (("rollback", "--registry", "{reg}"), "nothing to roll back to"),
        (("list", "--registry", "{tmp}"), "not a model registry"),
        (("rollback", "--registry", "{tmp}/nowhere"), "not a model registry"),
        (("publish", "--registry", "{reg}", "--model", "{tmp}/missing"), "not a model directory"),
    ],
)
def test_model_cli_errors_are_user_errors(
    tmp_path: Path, trained: Recommender, argv: tuple[str, ...], message: str
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    registry.publish(trained)
    filled = [a.format(reg=registry.root, tmp=tmp_path) for a in argv]
    with pytest.raises(UserError, match=message):
        run_model_command(*filled)
    assert [v.version for v in registry.list_versions()] == [registry.current_version()]


@pytest.mark.kafka
def test_publish_and_rollback_are_announced(
    kafka_bootstrap: str, topic_name: str, tmp_path: Path, trained: Recommender
) -> None:
    registry = ModelRegistry(
        tmp_path / "reg", announcer=KafkaAnnouncer(kafka_bootstrap, topic_name)
    )
    first = registry.publish(trained)
    second = registry.publish(trained)
    registry.rollback()
    messages = read_topic(kafka_bootstrap, topic_name, lambda ms: len(ms) >= 3, timeout=30)
    assert messages == [
        {"version": first, "path": str(registry.path_of(first).resolve()), "action": "publish"},
        {"version": second, "path": str(registry.path_of(second).resolve()), "action": "publish"},
        {"version": first, "path": str(registry.path_of(first).resolve()), "action": "rollback"},
    ]


def test_concurrent_publishes_and_rollbacks_through_the_cli_keep_the_registry_whole(
    tmp_path: Path, small_model: Path
) -> None:
    """The README's registry lock, as users hit it: several `model publish` and `model
    rollback` commands at once (a trainer and a person). Every publish gets its own
    sequence number, none is lost, the served history ends at CURRENT and names only
    retained, loadable versions, and no writer's leftovers remain."""
    root = tmp_path / "reg"
    command = [sys.executable, "-m", "stream.cli.main", "model"]
    first = subprocess.run(
        [*command, "publish", "--registry", str(root), "--model", str(small_model)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    publishers = [
        subprocess.Popen(
            [
                *command,
                "publish",
                "--registry",
                str(root),
                "--model",
                str(small_model),
                "--keep",
                "100",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(6)
    ]
    rollbacks = [
        subprocess.Popen(
            [*command, "rollback", "--registry", str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    for process in publishers:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    for process in rollbacks:
        process.communicate(timeout=300)  # may find nothing to roll back to: exit 2
        assert process.returncode in (0, 2)
    registry = ModelRegistry(root)
    versions = [path.name for path in (root / "versions").iterdir()]
    sequences = sorted(int(name.split("-")[0]) for name in versions)
    assert sequences == list(range(1, 8)), versions  # 7 publishes, 7 distinct versions
    history = registry.served_history()
    assert history[-1] == registry.current_version()
    assert set(history) <= set(versions) and len(history) == len(set(history))
    for version in history:
        registry.load(version)  # whole and verified
    assert leftovers(root) == []
