"""A trained model as a directory: written atomically, verified on load, never unpickled.

Layout (format 3)::

    MODEL_DIR/
      weights.safetensors   network tensors + item popularity (safetensors: no pickle)
      items.json            item ids in index order
      config.json           hyperparameters (GRU4RecConfig)
      optimizer.safetensors optional: Adagrad's state per parameter, packed
                            ``[accumulator | velocity]`` (see model.optim), so that a
                            warm-started fine-tune resumes the optimisation
      item_index.safetensors optional: the approximate-ranking index as plain arrays
                            (centroids, each item's list; parameters in its header; see
                            model.item_index), rebuilt into a searchable index at load
      metadata.json         format, version id, created, training stats, metrics,
                            and the SHA-256 of each of the other files

Format 3 added the optional optimizer state; format 2 artifacts (none) still load. Serving
never reads the optimizer state (``load_model(..., optimizer_state=False)``, the default):
its checksum is still verified, its tensors are read only when asked for.

A directory is written under a temporary name next to its destination and renamed into
place, so a reader sees a whole artifact or none. Every file is fsynced before the
directory is, and the directory before the rename: after a power cut the rename (and a
registry pointer moved after it) never names files whose bytes were not on disk.

Loading checks every checksum, the config's types, every tensor's shape and dtype (against
a network built on the meta device, so absurd sizes are refused, not allocated) and that
every weight is finite, before building the model: a truncated, tampered, incompatible or
diverged artifact is refused with a reason instead of being served.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model.config import GRU4RecConfig
from model.data import ItemMap
from model.errors import UserError
from model.inference import Recommender, select_device
from model.item_index import IndexParams, ItemIndex
from model.network import GRU4RecNetwork
from model.optim import packed_shape

FORMAT = 3  # 2: GRU layers gained a hidden-side bias; 3: optional optimizer state
READABLE_FORMATS = (2, 3)
WEIGHTS, ITEMS, CONFIG, METADATA = (
    "weights.safetensors",
    "items.json",
    "config.json",
    "metadata.json",
)
OPTIMIZER = "optimizer.safetensors"
INDEX = "item_index.safetensors"
#: Lines of items.json parsed per call (see _parse_item_ids).
_IDS_PER_PARSE = 8192
OPTIONAL_FILES = (OPTIMIZER, INDEX)
POPULARITY_KEY = "__popularity__"


def new_version_id() -> str:
    """A sortable, unique version id: UTC time plus random bits."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"v{stamp}-{secrets.token_hex(3)}"


def save_model(
    recommender: Recommender,
    directory: str | os.PathLike[str],
    *,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    version: str | None = None,
) -> Path:
    """Write ``recommender`` to ``directory`` (which must not exist yet); return the path.

    The version id is stored in the artifact and set on ``recommender``.
    """
    target = Path(directory)
    if target.exists():
        raise UserError(f"{target}: already exists; model directories are never overwritten")
    target.parent.mkdir(parents=True, exist_ok=True)
    version = version or new_version_id()
    staging = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        tensors = {
            name: t.detach().cpu().contiguous()
            for name, t in recommender.network.state_dict().items()
        }
        tensors[POPULARITY_KEY] = torch.from_numpy(recommender.popularity.copy())
        _save_tensors(tensors, staging / WEIGHTS)
        _write_json(staging / ITEMS, recommender.item_map.ids)
        _write_json(staging / CONFIG, recommender.config.to_dict())
        written = [WEIGHTS, ITEMS, CONFIG]
        if recommender.optimizer_state is not None:
            _save_tensors(
                {
                    name: t.detach().cpu().contiguous()
                    for name, t in recommender.optimizer_state.items()
                },
                staging / OPTIMIZER,
            )
            written.append(OPTIMIZER)
        if recommender.index is not None:
            _save_index(recommender.index, staging / INDEX)
            written.append(INDEX)
        metadata = {
            "format": FORMAT,
            "version": version,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "n_items": recommender.n_items,
            "state_size": recommender.state_size,
            "training": training or {},
            "metrics": metrics or {},
            "files": {name: _sha256(staging / name) for name in written},
        }
        _write_json(staging / METADATA, metadata)
        fsync_path(staging)
        os.rename(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    recommender.version = version
    recommender.metadata = metadata
    return target


def load_model(
    directory: str | os.PathLike[str], device: str | None = None, *, optimizer_state: bool = False
) -> Recommender:
    """Load and verify a model directory; raise :class:`UserError` if anything is off.

    ``optimizer_state``: also read the optimizer state, if the artifact has one (for a warm
    start to resume from; ``Recommender.optimizer_state`` stays None otherwise).
    """
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"{path}: not a model directory")
    if path.resolve().name.startswith(".") and ".tmp-" in path.name:
        raise UserError(f"{path}: an unfinished save (staging directory), never loaded")
    metadata = _read_json(path, METADATA)
    if not isinstance(metadata, dict) or metadata.get("format") not in READABLE_FORMATS:
        raise UserError(
            f"{path}: unsupported artifact format {metadata.get('format')!r} "
            f"(this streamrec reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))})"
            if isinstance(metadata, dict)
            else f"{path}: {METADATA} is not an object"
        )
    files = metadata.get("files", {})
    if not isinstance(files, dict):
        raise UserError(f"{path}: {METADATA} has no file checksums")
    for name in OPTIONAL_FILES:
        if (path / name).exists() and name not in files:
            raise UserError(
                f"{path}: {name} is not covered by {METADATA}'s checksums (tampered artifact)"
            )
    has_optimizer = OPTIMIZER in files
    checked = (WEIGHTS, ITEMS, CONFIG) + tuple(name for name in OPTIONAL_FILES if name in files)
    for name in checked:
        if not (path / name).is_file():
            raise UserError(f"{path}: missing {name} (partial or truncated artifact)")
        if files.get(name) != _sha256(path / name):
            raise UserError(f"{path}: checksum mismatch for {name} (corrupt or tampered)")
    try:
        config = GRU4RecConfig.from_dict(_read_json(path, CONFIG))
    except UserError as exc:
        raise UserError(f"{path}: {CONFIG}: {exc}") from None
    item_ids = _read_json(path, ITEMS, _parse_item_ids)
    if not isinstance(item_ids, list) or not all(isinstance(i, str) for i in item_ids):
        raise UserError(f"{path}: {ITEMS} must be a list of distinct item id strings")
    item_map = ItemMap(item_ids)  # a loop, not one C call: see _parse_item_ids
    if len(item_map) != len(item_ids):
        raise UserError(f"{path}: {ITEMS} must be a list of distinct item id strings")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: cannot read {WEIGHTS}: {exc}") from None
    popularity = tensors.pop(POPULARITY_KEY, None)
    # On the meta device the network has shapes but no storage: a config.json asking for
    # absurd sizes is refused by the comparison below instead of being allocated first.
    try:
        with torch.device("meta"):
            network = GRU4RecNetwork(config, len(item_ids))
    except RuntimeError as exc:  # a size beyond what torch can even describe
        raise UserError(
            f"{path}: {CONFIG} asks for tensors too large to exist (layers "
            f"{config.layers}, embedding {config.embedding}; incompatible artifact): {exc}"
        ) from None
    expected = dict(network.state_dict())
    if popularity is None or tuple(popularity.shape) != (len(item_ids),):
        raise UserError(
            f"{path}: {WEIGHTS} has no item popularity for the {len(item_ids)} items of "
            f"{ITEMS} (incompatible artifact)"
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(
            f"{path}: {WEIGHTS} holds {', '.join(extra)}, unknown to the network "
            f"{CONFIG} describes (incompatible artifact)"
        )
    for name, want in expected.items():
        have = tensors.get(name)
        if have is None or (have.shape, have.dtype) != (want.shape, want.dtype):
            held = "lacks it" if have is None else f"has {_describe(have)}"
            raise UserError(
                f"{path}: {CONFIG} and {ITEMS} need {name} of {_describe(want)}, but "
                f"{WEIGHTS} {held} (incompatible artifact)"
            )
    for name, tensor in [*tensors.items(), (POPULARITY_KEY, popularity)]:
        # NaN scores would be published as invalid JSON or rank one item everywhere.
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"{path}: {WEIGHTS} holds values that are not finite (NaN or infinite) "
                f"in {name} (corrupt artifact)"
            )
    network.load_state_dict(tensors, assign=True)  # the loaded tensors replace the meta ones
    torch_device = select_device(device)
    network.to(torch_device)
    state = _load_optimizer_state(path, network) if optimizer_state and has_optimizer else None
    if state is not None:
        state = {name: t.to(torch_device) for name, t in state.items()}
    index = _load_index(path, network) if INDEX in files else None
    return Recommender(
        network,
        item_map,
        popularity.numpy().astype(np.float64),
        config,
        version=str(metadata.get("version", "unknown")),
        metadata=metadata,
        optimizer_state=state,
        index=index,
    )


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"


def _save_index(index: ItemIndex, path: Path) -> None:
    params = {name: str(value) for name, value in asdict(index.params).items()}
    _save_tensors(
        {"centroids": torch.from_numpy(index.centroids), "lists": torch.from_numpy(index.lists)},
        path,
        metadata=params,
    )


def _save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``save_file``, then fsync: safetensors does not sync what it writes."""
    save_file(tensors, str(path), metadata=metadata)
    fsync_path(path)


def _load_index(path: Path, network: GRU4RecNetwork) -> ItemIndex:
    """The index, rebuilt from its arrays over the network's item vectors."""
    try:
        with safe_open(str(path / INDEX), framework="pt") as stored:
            header = stored.metadata() or {}
            arrays = {name: stored.get_tensor(name) for name in ("centroids", "lists")}
        params = IndexParams(
            **{f.name: int(header[f.name]) for f in fields(IndexParams) if f.name in header}
        )
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: cannot read {INDEX}: {exc}") from None
    return ItemIndex(
        arrays["centroids"].numpy(),
        arrays["lists"].numpy(),
        network.item_output,
        network.item_bias,
        params,
    )


def _load_optimizer_state(path: Path, network: GRU4RecNetwork) -> dict[str, torch.Tensor]:
    """The optimizer state, checked against the network: one packed tensor per parameter,
    of the parameter's shape with a last dimension twice as wide, finite."""
    try:
        state = load_file(str(path / OPTIMIZER))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: cannot read {OPTIMIZER}: {exc}") from None
    params = dict(network.named_parameters())
    expected = {name: (packed_shape(p), p.dtype) for name, p in params.items()}
    found = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    if expected != found:
        raise UserError(f"{path}: {OPTIMIZER} does not match the weights (incompatible artifact)")
    for name, packed in state.items():
        accumulator = packed[..., : params[name].shape[-1]]
        if not bool(torch.isfinite(packed).all()) or bool((accumulator < 0).any()):
            raise UserError(
                f"{path}: {OPTIMIZER} holds invalid values for {name} (corrupt artifact)"
            )
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _read_json(directory: Path, name: str, parse: Callable[[TextIO], Any] = json.load) -> Any:
    try:
        with open(directory / name, encoding="utf-8") as handle:
            return parse(handle)
    except FileNotFoundError:
        raise UserError(
            f"{directory}: missing {name} (not a model directory, or a partial one)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{directory}: {name} is not valid JSON ({exc})") from None


def _parse_item_ids(handle: TextIO) -> Any:
    """``items.json``, parsed :data:`_IDS_PER_PARSE` lines at a time when it holds one id
    per line (as :func:`save_model` writes it), else in one go.

    A worker loads a new version in a thread beside its event loop, and every C call that
    holds the GIL stalls the loop for as long: parsing a million ids at once took 95 ms,
    and the ``set`` that checked them for duplicates 140 ms, gaps in the answers measured
    at a swap. Slices of lines, and :class:`ItemMap`'s Python loop, let the loop run."""
    if handle.readline().strip() != "[":
        handle.seek(0)
        return json.load(handle)
    ids: list[Any] = []
    closed = False
    while not closed:
        lines = list(itertools.islice(handle, _IDS_PER_PARSE))
        if not lines:
            raise json.JSONDecodeError("the list is not closed", "", 0)
        text = "".join(lines).strip()
        closed = text.endswith("]")
        text = text.removesuffix("]").rstrip().removesuffix(",")
        ids.extend(json.loads(f"[{text}]"))
    if handle.read().strip():
        raise json.JSONDecodeError("extra data after the list", "", 0)
    return ids


def fsync_path(path: Path) -> None:
    """Make a file's bytes durable, or a rename or a new entry in a directory (the
    directory's own fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
