"""Model directories: atomic save, verified load, and every way a bad artifact is refused."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model import artifact
from model.artifact import FORMAT, OPTIMIZER, load_model, save_model
from model.config import GRU4RecConfig
from model.data import ItemMap
from model.errors import UserError
from model.inference import Recommender
from model.network import GRU4RecNetwork
from model.optim import packed_shape

REPO = Path(__file__).resolve().parents[1]
FILES = ("weights.safetensors", "items.json", "config.json", "metadata.json")
CONFIGS = {
    "tied": GRU4RecConfig(layers=(8,), n_epochs=1),
    "one-hot": GRU4RecConfig(layers=(8, 4), constrained_embedding=False, n_epochs=1),
    "embedding": GRU4RecConfig(layers=(8,), constrained_embedding=False, embedding=5, n_epochs=1),
}


def make_recommender(
    config: GRU4RecConfig = CONFIGS["tied"], n_items: int = 6, seed: int = 0
) -> Recommender:
    generator = torch.Generator().manual_seed(seed)
    network = GRU4RecNetwork(config, n_items, generator=generator)
    with torch.no_grad():  # biases start at zero: make them worth round-tripping
        network.item_bias.uniform_(-1, 1, generator=generator)
        for bias in network.biases:
            bias.uniform_(-1, 1, generator=generator)
    item_map = ItemMap([f"item-{k:02d}" for k in range(n_items)])
    popularity = np.arange(n_items, dtype=np.float64) * 3 + 1
    return Recommender(network, item_map, popularity, config)


def sample_scores(recommender: Recommender) -> torch.Tensor:
    states = recommender.initial_states(3)
    states = recommender.step(states, torch.tensor([0, 2, -1]))
    states = recommender.step(states, torch.tensor([5, -1, -1]))
    return recommender.scores(states, torch.tensor([True, True, False]))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refresh_checksum(model_dir: Path, name: str) -> None:
    """Make metadata.json agree with an edited file, to reach the checks behind the hash."""
    metadata_path = model_dir / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["files"][name] = sha256(model_dir / name)
    metadata_path.write_text(json.dumps(metadata))


def refused(model_dir: Path, *words: str) -> str:
    with pytest.raises(UserError) as info:
        load_model(model_dir, device="cpu")
    message = str(info.value)
    assert str(model_dir) in message, message
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"
    return message


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_model(make_recommender(), tmp_path / "models" / "m1", version="v-test-1")


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_gives_the_same_model(tmp_path: Path, name: str) -> None:
    original = make_recommender(CONFIGS[name])
    target = tmp_path / "model"
    assert save_model(original, target, version="v-round-trip") == target
    loaded = load_model(target, device="cpu")
    assert loaded.config == original.config
    assert loaded.item_map.ids == original.item_map.ids
    np.testing.assert_array_equal(loaded.popularity, original.popularity)
    original_state = original.network.state_dict()
    loaded_state = loaded.network.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key in original_state:
        assert torch.equal(original_state[key].cpu(), loaded_state[key].cpu()), key
    assert torch.equal(sample_scores(original).cpu(), sample_scores(loaded).cpu())
    assert loaded.version == original.version == "v-round-trip"


def test_version_and_metadata(tmp_path: Path) -> None:
    recommender = make_recommender()
    target = save_model(
        recommender,
        tmp_path / "model",
        version="v-keep-me",
        training={"epochs": 3, "final_loss": 1.25},
        metrics={"recall@20": 0.5},
    )
    metadata = json.loads((target / "metadata.json").read_text())
    assert metadata["format"] == FORMAT == 3
    assert metadata["version"] == "v-keep-me"
    assert metadata["n_items"] == 6 and metadata["state_size"] == 8
    assert metadata["training"] == {"epochs": 3, "final_loss": 1.25}
    assert metadata["metrics"] == {"recall@20": 0.5}
    assert metadata["files"] == {
        name: sha256(target / name) for name in ("weights.safetensors", "items.json", "config.json")
    }
    loaded = load_model(target, device="cpu")
    assert loaded.version == "v-keep-me"
    assert loaded.metadata["files"] == metadata["files"]
    assert recommender.version == "v-keep-me"


def test_generated_version_ids_are_unique(tmp_path: Path) -> None:
    first, second = make_recommender(), make_recommender()
    save_model(first, tmp_path / "a")
    save_model(second, tmp_path / "b")
    assert first.version != second.version
    assert load_model(tmp_path / "a", device="cpu").version == first.version


def test_no_temporary_directory_is_left_after_a_save(tmp_path: Path) -> None:
    parent = tmp_path / "models"
    save_model(make_recommender(), parent / "m1")
    save_model(make_recommender(), parent / "m2")
    assert sorted(p.name for p in parent.iterdir()) == ["m1", "m2"]
    assert sorted(p.name for p in (parent / "m1").iterdir()) == sorted(FILES)


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    parent = tmp_path / "models"
    parent.mkdir()
    with pytest.raises(TypeError):  # not JSON-serialisable: fails while writing metadata
        save_model(make_recommender(), parent / "m1", training={"when": object()})
    assert list(parent.iterdir()) == []


# --- refusals -------------------------------------------------------------------------------


def test_refuses_an_existing_target(saved: Path) -> None:
    before = {name: sha256(saved / name) for name in FILES}
    with pytest.raises(UserError, match="already exists"):
        save_model(make_recommender(seed=1), saved)
    assert {name: sha256(saved / name) for name in FILES} == before


def test_refuses_an_existing_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="already exists"):
        save_model(make_recommender(), tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_refuses_a_flipped_byte_in_the_weights(saved: Path) -> None:
    path = saved / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) - 20] ^= 0x01  # inside the tensor data, past the header
    path.write_bytes(bytes(data))
    refused(saved, "weights.safetensors", "checksum")


def test_refuses_truncated_weights(saved: Path) -> None:
    path = saved / "weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(saved, "weights.safetensors")


def test_refuses_truncated_weights_even_with_a_matching_checksum(saved: Path) -> None:
    path = saved / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    refresh_checksum(saved, "weights.safetensors")
    refused(saved, "weights.safetensors")


AWKWARD_IDS = ['a"b', "c,d", "[e]", "f\ng", "é ü 商品", "h]", ",", '"]', "\\", "last"]


def test_item_ids_parsed_in_slices_of_lines_round_trip_whatever_they_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """items.json is parsed a few lines at a time (a single parse of a million ids held
    the GIL for 95 ms beside a worker's event loop); ids with quotes, commas, brackets,
    escapes and newlines must come back exactly, however the slices fall."""
    original = make_recommender(n_items=len(AWKWARD_IDS))
    original.item_map = ItemMap(AWKWARD_IDS)
    target = save_model(original, tmp_path / "model")
    for per_parse in (1, 2, 3, 7, 100):
        monkeypatch.setattr(artifact, "_IDS_PER_PARSE", per_parse)
        assert load_model(target, device="cpu").item_map.ids == AWKWARD_IDS


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(AWKWARD_IDS),
        json.dumps(AWKWARD_IDS, indent=4),
        "[\n" + json.dumps(AWKWARD_IDS)[1:],
    ],
)
def test_item_ids_written_another_way_still_load(saved: Path, text: str) -> None:
    """Any JSON list of ids loads: on one line, indented otherwise, or with the opening
    bracket on a line of its own and the ids on the next."""
    recommender = make_recommender(n_items=len(AWKWARD_IDS))
    target = save_model(recommender, saved.parent / "other")
    (target / "items.json").write_text(text)
    refresh_checksum(target, "items.json")
    assert load_model(target, device="cpu").item_map.ids == AWKWARD_IDS


@pytest.mark.parametrize("text", ['[\n "a",\n "b",\n', '[\n "a"\n]\n "b"', '[\n "a",,\n]'])
def test_item_ids_not_a_closed_list_are_refused(saved: Path, text: str) -> None:
    (saved / "items.json").write_text(text)
    refresh_checksum(saved, "items.json")
    refused(saved, "items.json", "not valid JSON")


def test_refuses_edited_items(saved: Path) -> None:
    path = saved / "items.json"
    ids = json.loads(path.read_text())
    ids[0], ids[1] = ids[1], ids[0]
    path.write_text(json.dumps(ids, indent=1))
    refused(saved, "items.json", "checksum")


@pytest.mark.parametrize(
    ("ids", "word"),
    [
        (["item-00", "item-00", "item-02", "item-03", "item-04", "item-05"], "items.json"),
        (["item-00", "item-01", "item-02", "item-03", "item-04"], "weights"),
        ({"item-00": 0}, "items.json"),
    ],
)
def test_refuses_inconsistent_items_with_a_matching_checksum(
    saved: Path, ids: object, word: str
) -> None:
    (saved / "items.json").write_text(json.dumps(ids))
    refresh_checksum(saved, "items.json")
    refused(saved, word)


@pytest.mark.parametrize("name", FILES)
def test_refuses_a_missing_file(saved: Path, name: str) -> None:
    (saved / name).unlink()
    refused(saved, name, "missing")


def test_refuses_config_with_an_unknown_key(saved: Path) -> None:
    path = saved / "config.json"
    config = json.loads(path.read_text())
    config["attention_heads"] = 4
    path.write_text(json.dumps(config))
    refused(saved, "config.json", "checksum")
    refresh_checksum(saved, "config.json")  # the config check itself, behind the checksum
    with pytest.raises(UserError, match="attention_heads"):
        load_model(saved, device="cpu")


def test_refuses_config_that_does_not_match_the_weights(saved: Path) -> None:
    path = saved / "config.json"
    config = json.loads(path.read_text())
    config["layers"] = [9]
    path.write_text(json.dumps(config))
    refresh_checksum(saved, "config.json")
    refused(saved, "weights")


@pytest.mark.parametrize(
    "key, value",
    [("layers", 100), ("layers", ["8"]), ("batch_size", "32"), ("learning_rate", None)],
)
def test_refuses_config_with_wrong_types(saved: Path, key: str, value: object) -> None:
    path = saved / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    refresh_checksum(saved, "config.json")
    refused(saved, "config.json", key)


@pytest.mark.parametrize(
    "change, words",
    [
        # 12 TB of GRU weights on the meta device: compared, never allocated
        ({"layers": [10**6]}, ("weights.safetensors", "item_output", "(6, 1000000)")),
        ({"layers": [10**6, 8]}, ("weights.safetensors", "input_weights.0", "(8, 3000000)")),
        ({"layers": [10**9]}, ("too large",)),  # more bytes than an int64 counts
        (
            {"constrained_embedding": False, "embedding": 10**9},
            ("weights.safetensors", "item_input"),
        ),
    ],
)
def test_refuses_absurd_sizes_before_allocating_them(
    saved: Path, change: dict[str, Any], words: tuple[str, ...]
) -> None:
    path = saved / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    refresh_checksum(saved, "config.json")
    refused(saved, "config.json", *words)


def rewrite_weights(model_dir: Path, change: Any) -> None:
    from safetensors.torch import load_file as read
    from safetensors.torch import save_file as write

    weights = read(str(model_dir / "weights.safetensors"))
    change(weights)
    write(weights, str(model_dir / "weights.safetensors"))
    refresh_checksum(model_dir, "weights.safetensors")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["item_output", "hidden_weights.0", "biases.0", "__popularity__"])
def test_refuses_weights_that_are_not_finite(saved: Path, name: str, value: float) -> None:
    def spoil(weights: dict[str, torch.Tensor]) -> None:
        weights[name].view(-1)[1] = value

    rewrite_weights(saved, spoil)
    refused(saved, "weights.safetensors", name, "not finite")


def test_refuses_weights_of_another_dtype(saved: Path) -> None:
    rewrite_weights(saved, lambda w: w.update(item_output=w["item_output"].double()))
    refused(saved, "weights.safetensors", "item_output", "float64")


@pytest.mark.parametrize("fmt", [1, 4, 0, "2", "3", None])
def test_refuses_an_unsupported_format(saved: Path, fmt: object) -> None:
    path = saved / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata["format"] = fmt
    path.write_text(json.dumps(metadata))
    refused(saved, "format", repr(fmt))


def test_refuses_metadata_that_is_not_json(saved: Path) -> None:
    (saved / "metadata.json").write_text('{"format": 1, "vers')
    refused(saved, "metadata.json")


def test_refuses_a_path_that_is_not_a_directory(tmp_path: Path, saved: Path) -> None:
    refused(tmp_path / "nothing-here")
    refused(saved / "weights.safetensors")


# --- optimizer state -------------------------------------------------------------------------


def with_optimizer_state(recommender: Recommender, seed: int = 0) -> Recommender:
    """Give ``recommender`` an optimizer state: non-negative accumulators, any velocity."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in recommender.network.named_parameters():
        packed = torch.randn(packed_shape(param), generator=generator)
        width = param.shape[-1]
        packed[..., :width] = packed[..., :width].abs()
        state[name] = packed
    recommender.optimizer_state = state
    return recommender


@pytest.fixture
def saved_with_state(tmp_path: Path) -> Path:
    return save_model(
        with_optimizer_state(make_recommender()), tmp_path / "models" / "s1", version="v-test-state"
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_with_the_optimizer_state(tmp_path: Path, name: str) -> None:
    original = with_optimizer_state(make_recommender(CONFIGS[name]))
    target = save_model(original, tmp_path / "model")
    metadata = json.loads((target / "metadata.json").read_text())
    assert metadata["files"][OPTIMIZER] == sha256(target / OPTIMIZER)
    loaded = load_model(target, device="cpu", optimizer_state=True)
    assert loaded.optimizer_state is not None
    assert loaded.optimizer_state.keys() == original.optimizer_state.keys()
    for key, value in original.optimizer_state.items():
        assert torch.equal(loaded.optimizer_state[key], value), key
    assert torch.equal(sample_scores(original), sample_scores(loaded))
    # serving does not read it (but its checksum is still verified)
    assert load_model(target, device="cpu").optimizer_state is None


def test_an_artifact_without_optimizer_state_loads_without_one(saved: Path) -> None:
    assert not (saved / OPTIMIZER).exists()
    assert load_model(saved, device="cpu", optimizer_state=True).optimizer_state is None


def test_a_format_2_artifact_still_loads(saved: Path) -> None:
    metadata_path = saved / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["format"] = 2  # what streamrec wrote before optimizer states
    metadata_path.write_text(json.dumps(metadata))
    loaded = load_model(saved, device="cpu", optimizer_state=True)
    assert loaded.optimizer_state is None
    assert torch.equal(sample_scores(loaded), sample_scores(make_recommender()))


def test_refuses_a_flipped_byte_in_the_optimizer_state(saved_with_state: Path) -> None:
    path = saved_with_state / OPTIMIZER
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    refused(saved_with_state, "checksum", OPTIMIZER)  # even when serving, which skips it


def test_refuses_a_missing_optimizer_state_the_metadata_lists(saved_with_state: Path) -> None:
    (saved_with_state / OPTIMIZER).unlink()
    refused(saved_with_state, "missing", OPTIMIZER)


def test_refuses_an_optimizer_state_the_metadata_does_not_list(
    saved: Path, saved_with_state: Path
) -> None:
    shutil.copy(saved_with_state / OPTIMIZER, saved / OPTIMIZER)
    refused(saved, OPTIMIZER, "not covered")


def optimizer_refused(model_dir: Path, *words: str) -> None:
    with pytest.raises(UserError) as info:
        load_model(model_dir, device="cpu", optimizer_state=True)
    for word in (str(model_dir), OPTIMIZER, *words):
        assert word in str(info.value), f"{word!r} missing from {info.value}"


def rewrite_state(model_dir: Path, change: Any) -> None:
    from safetensors.torch import load_file as read
    from safetensors.torch import save_file as write

    state = read(str(model_dir / OPTIMIZER))
    change(state)
    write(state, str(model_dir / OPTIMIZER))
    refresh_checksum(model_dir, OPTIMIZER)


def test_refuses_an_optimizer_state_that_does_not_match_the_weights(saved_with_state: Path) -> None:
    rewrite_state(
        saved_with_state, lambda state: state.update(item_output=state["item_output"][:4])
    )
    optimizer_refused(saved_with_state, "does not match")


def test_refuses_an_optimizer_state_with_a_parameter_missing(saved_with_state: Path) -> None:
    rewrite_state(saved_with_state, lambda state: state.pop("item_bias"))
    optimizer_refused(saved_with_state, "does not match")


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_refuses_invalid_accumulators(saved_with_state: Path, value: float) -> None:
    def spoil(state: dict[str, torch.Tensor]) -> None:
        state["item_output"][2, 0] = value  # an accumulator (first half of the row)

    rewrite_state(saved_with_state, spoil)
    optimizer_refused(saved_with_state, "invalid", "item_output")


# --- staging directories --------------------------------------------------------------------

CRASHING_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from model.artifact import save_model
    from model.config import GRU4RecConfig
    from model.data import ItemMap
    from model.inference import Recommender
    from model.network import GRU4RecNetwork

    class KilledWhileWriting(dict):
        # json asks for the items while writing metadata.json: die like a SIGKILL then
        def items(self):
            os.kill(os.getpid(), signal.SIGKILL)

    config = GRU4RecConfig(layers=(8,))
    rec = Recommender(GRU4RecNetwork(config, 4), ItemMap(["a", "b", "c", "d"]),
                      np.ones(4), config)
    save_model(rec, sys.argv[2], training=KilledWhileWriting(epochs=1))
    print("not killed")
""")


def test_a_save_killed_midway_leaves_only_an_unloadable_staging_dir(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m1"
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_SAVE, str(REPO), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, done.stderr
    assert not target.exists()
    staging = list((tmp_path / "models").iterdir())
    assert len(staging) == 1 and ".tmp-" in staging[0].name
    assert (staging[0] / "weights.safetensors").is_file()
    with pytest.raises(UserError):
        load_model(staging[0], device="cpu")
    with pytest.raises(UserError):
        load_model(target, device="cpu")


def test_a_complete_staging_dir_is_not_loadable(saved: Path) -> None:
    # what a crash between writing metadata.json and the final rename leaves behind
    staging = saved.parent / ".m2.tmp-0123abcd"
    shutil.copytree(saved, staging)
    with pytest.raises(UserError):
        load_model(staging, device="cpu")
