"""``streamrec model publish|list|rollback``: manage a model registry."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from model.errors import UserError
from stream.cli.base import print_json
from stream.kafka.announcer import KafkaAnnouncer
from stream.registry import DEFAULT_KEEP, DEFAULT_UPDATES_TOPIC, VERSIONS, ModelRegistry


def _registry_from(args: argparse.Namespace, *, must_exist: bool = True) -> ModelRegistry:
    """The registry named on the command line; checked before connecting to announce."""
    if must_exist and not (Path(args.registry) / VERSIONS).is_dir():
        raise UserError(f"{args.registry}: not a model registry (no {VERSIONS}/ directory)")
    announcer = KafkaAnnouncer(args.broker, args.updates_topic) if args.broker else None
    return ModelRegistry(args.registry, keep=args.keep, announcer=announcer)


def run_publish(args: argparse.Namespace) -> int:
    registry = _registry_from(args, must_exist=False)
    version = registry.publish_directory(args.model)
    print_json(
        {
            "registry": str(registry.root),
            "version": version,
            "path": str(registry.path_of(version)),
            "retained": [v.version for v in registry.list_versions()],
        }
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print the retained versions and the served history (oldest first, the current
    version last: a rollback goes to the one before it)."""
    registry = _registry_from(args)
    print_json(
        {
            "registry": str(registry.root),
            "current": registry.current_version(),
            "versions": [v.to_dict() for v in registry.list_versions()],
            "history": registry.served_history(),
        }
    )
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    registry = _registry_from(args)
    previous = registry.current_version()
    version = registry.rollback()
    print_json(
        {
            "registry": str(registry.root),
            "version": version,
            "previous": previous,
            "path": str(registry.path_of(version)),
        }
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``streamrec model publish|list|rollback``."""
    parser = subparsers.add_parser(
        "model",
        help="manage a model registry: publish, list, rollback",
        description="A registry directory holds immutable model versions and a CURRENT "
        "pointer; workers started with --model REGISTRY follow the pointer.",
    )
    commands = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    def action(
        name: str, help: str, run: Callable[[argparse.Namespace], int], announces: bool
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--registry", required=True, help="registry directory")
        if announces:
            sub.add_argument(
                "--broker", default=None, help="also announce the move on Kafka (kafka://HOST:PORT)"
            )
            sub.add_argument(
                "--updates-topic",
                default=DEFAULT_UPDATES_TOPIC,
                help=f"announcement topic (default {DEFAULT_UPDATES_TOPIC})",
            )
        sub.set_defaults(
            run=run, broker=None, updates_topic=DEFAULT_UPDATES_TOPIC, keep=DEFAULT_KEEP
        )
        return sub

    publish = action(
        "publish",
        "import a model directory as the new current version",
        run_publish,
        announces=True,
    )
    publish.add_argument("--model", required=True, help="model directory to import")
    publish.add_argument(
        "--keep",
        type=int,
        default=DEFAULT_KEEP,
        help=f"retain the last KEEP versions published and the last KEEP served (default "
        f"{DEFAULT_KEEP}; the current one is never deleted)",
    )
    action(
        "list",
        "list retained versions, oldest first, and the served history",
        run_list,
        announces=False,
    )
    action(
        "rollback",
        "make the version served before the current one current again",
        run_rollback,
        announces=True,
    )
