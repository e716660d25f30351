"""Approximate ranking: the item index, its artifact file, and what it serves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import inference
from model.artifact import INDEX, METADATA, load_model, save_model
from model.config import GRU4RecConfig
from model.data import ClickLog
from model.errors import UserError
from model.evaluate import RecommenderScorer, evaluate
from model.inference import Recommender
from model.item_index import IndexParams, ItemIndex
from model.synth import SynthSpec, generate
from model.train import train
from stream.devtools.testing import clustered, states_of

CONFIG = GRU4RecConfig(layers=(16,))


def exact_and_approximate(
    recommender: Recommender, states: torch.Tensor, k: int = 20
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    started = torch.ones(len(states), dtype=torch.bool)
    recommender.use_ranking("exact")
    exact = recommender.top_k(states, started, k)
    recommender.use_ranking("approximate")
    return exact, recommender.top_k(states, started, k)


def test_probing_every_list_is_exact() -> None:
    recommender = clustered(3000)
    recommender.index = ItemIndex.build(
        recommender.network.item_output,
        recommender.network.item_bias,
        IndexParams(n_lists=8, n_probe=8, candidates=60),
    )
    (exact_items, exact_scores), (items, scores) = exact_and_approximate(
        recommender, states_of(recommender, 50)
    )
    assert torch.equal(items, exact_items)
    assert torch.allclose(scores, exact_scores, atol=1e-5)


def test_answers_are_re_ranked_with_the_models_own_scores() -> None:
    """Every returned score is the float32 score of that item, best first."""
    recommender = clustered(20_000)
    recommender.build_index()
    states = states_of(recommender, 64)
    _, (items, scores) = exact_and_approximate(recommender, states)
    full = recommender.scores(states, torch.ones(64, dtype=torch.bool))
    assert torch.allclose(full.gather(1, items), scores, rtol=1e-5, atol=1e-5)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    assert len(set(items[0].tolist())) == 20


def test_recall_against_exact_on_clustered_items() -> None:
    recommender = clustered(20_000)
    recommender.index = ItemIndex.build(
        recommender.network.item_output,
        recommender.network.item_bias,
        IndexParams(n_lists=512, n_probe=64, candidates=100),
    )
    (exact_items, _), (items, _) = exact_and_approximate(recommender, states_of(recommender, 200))
    recall = np.mean(
        [len(set(a.tolist()) & set(e.tolist())) / 20 for a, e in zip(items, exact_items)]
    )
    assert recall >= 0.99


def test_the_head_finds_large_bias_items_whatever_the_session() -> None:
    """Items whose bias puts them in every top-20 sit in no list a session's direction
    probes; the head, scanned for every query, finds them."""
    recommender = clustered(20_000)
    with torch.no_grad():
        recommender.network.item_bias[:5] += 100.0  # beyond any h·e: in every top-20
    vectors, bias = recommender.network.item_output, recommender.network.item_bias
    states = states_of(recommender, 100)
    outputs = recommender.network.last_output(states)
    for head, finds_all in ((0, False), (50, True)):
        index = ItemIndex.build(vectors, bias, IndexParams(64, 1, 32, head=head))
        assert set(range(5)) <= set(index.head_items.tolist()) or head == 0
        items, _ = index.top_k(outputs, 20)
        found_all = all(set(range(5)) <= set(row.tolist()) for row in items)
        assert found_all == finds_all
    with pytest.raises(UserError, match="51 head items"):
        lists = index.lists.copy()
        lists[np.flatnonzero(lists != 64)[0]] = 64
        ItemIndex(index.centroids, lists, vectors, bias, index.params)


def test_sessions_not_started_get_the_popular_items(tmp_path: Path) -> None:
    recommender = clustered(20_000)
    recommender.build_index()
    recommender.use_ranking("approximate")
    states = recommender.initial_states(3)
    items, _ = recommender.top_k(states, torch.zeros(3, dtype=torch.bool), 5)
    recommender.use_ranking("exact")
    expected, _ = recommender.top_k(states, torch.zeros(3, dtype=torch.bool), 5)
    assert torch.equal(items, expected)


def test_the_index_round_trips_with_its_checksum(tmp_path: Path) -> None:
    recommender = clustered(12_000)
    recommender.build_index()
    assert recommender.index is not None
    save_model(recommender, tmp_path / "m")
    metadata = json.loads((tmp_path / "m" / METADATA).read_text())
    assert INDEX in metadata["files"]
    loaded = load_model(tmp_path / "m")
    assert loaded.index is not None
    assert np.array_equal(loaded.index.lists, recommender.index.lists)
    assert np.array_equal(loaded.index.centroids, recommender.index.centroids)
    assert loaded.index.params == recommender.index.params
    states = states_of(loaded, 20)
    started = torch.ones(20, dtype=torch.bool)
    for model in (loaded, recommender):
        model.use_ranking("approximate")
    assert torch.equal(
        loaded.top_k(states, started, 20)[0], recommender.top_k(states, started, 20)[0]
    )


def test_an_index_saved_without_a_head_still_loads(tmp_path: Path) -> None:
    """Versions published before the head existed keep serving approximately."""
    recommender = clustered(12_000)
    recommender.index = ItemIndex.build(
        recommender.network.item_output, recommender.network.item_bias, IndexParams(64, 8, 32)
    )
    save_model(recommender, tmp_path / "m")
    path, metadata_path = tmp_path / "m" / INDEX, tmp_path / "m" / METADATA
    with safe_open(str(path), framework="pt") as stored:
        header = {k: v for k, v in (stored.metadata() or {}).items() if k != "head"}
        arrays = {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118
    save_file(arrays, str(path), metadata=header)
    metadata = json.loads(metadata_path.read_text())
    metadata["files"][INDEX] = hashlib.sha256(path.read_bytes()).hexdigest()
    metadata_path.write_text(json.dumps(metadata))
    loaded = load_model(tmp_path / "m")
    assert loaded.index is not None and loaded.index.params == IndexParams(64, 8, 32, head=0)


def test_a_corrupted_index_is_refused(tmp_path: Path) -> None:
    recommender = clustered(12_000)
    recommender.build_index()
    save_model(recommender, tmp_path / "m")
    path = tmp_path / "m" / INDEX
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"checksum mismatch for {INDEX}"):
        load_model(tmp_path / "m")


def test_an_index_file_outside_the_checksums_is_refused(tmp_path: Path) -> None:
    recommender = clustered(12_000)
    save_model(recommender, tmp_path / "plain")  # no index: below nothing, never built
    indexed = clustered(12_000)
    indexed.build_index()
    save_model(indexed, tmp_path / "indexed")
    (tmp_path / "plain" / INDEX).write_bytes((tmp_path / "indexed" / INDEX).read_bytes())
    with pytest.raises(UserError, match="not covered"):
        load_model(tmp_path / "plain")


def test_an_index_that_does_not_fit_the_model_is_refused() -> None:
    small, large = clustered(12_000), clustered(13_000)
    small.build_index()
    assert small.index is not None
    with pytest.raises(UserError, match="does not fit"):
        ItemIndex(
            small.index.centroids,
            small.index.lists,
            large.network.item_output,
            large.network.item_bias,
            small.index.params,
        )


def test_small_catalogues_get_no_index_and_auto_ranks_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = clustered(500)
    small.build_index()
    assert small.index is None and small.use_ranking("auto") == "exact"
    large = clustered(12_000)
    large.build_index()
    monkeypatch.setattr(inference, "APPROXIMATE_FROM", 10_000)
    assert large.use_ranking("auto").startswith("approximate")
    monkeypatch.setattr(inference, "APPROXIMATE_FROM", 20_000)
    assert large.use_ranking("auto") == "exact"
    with pytest.raises(UserError, match="ranking must be one of"):
        large.use_ranking("fast")


def test_approximate_without_an_index_builds_one_and_says_so() -> None:
    recommender = clustered(3000)
    assert recommender.index is None
    assert "built now" in recommender.use_ranking("approximate")
    assert recommender.index is not None


def test_a_fine_tuned_version_indexes_its_new_items(monkeypatch: pytest.MonkeyPatch) -> None:
    """The version that learns new items can recommend them: they are in its index."""
    monkeypatch.setattr(inference, "INDEX_FROM", 100)
    log = generate(SynthSpec(sessions=1500, items=600, seed=0))
    old = ClickLog.from_arrays(
        *(
            a[np.isin(log.item_ids[log.items], [str(i) for i in range(1, 501)])]
            for a in (log.session_ids[log.sessions], log.item_ids[log.items], log.times)
        ),
        source="old",
    )
    base, _ = train(old, CONFIG.replace(n_epochs=1), seed=0, progress=False)
    base.build_index()
    assert base.index is not None
    candidate, _ = train(log, CONFIG.replace(n_epochs=1), seed=0, base=base, progress=False)
    assert candidate.n_items > base.n_items
    candidate.build_index(base=base)
    assert candidate.index is not None
    assert len(candidate.index.lists) == candidate.n_items
    assert np.array_equal(candidate.index.lists[: base.n_items], base.index.lists)
    # A state whose output is a new item's vector finds that item.
    new = base.n_items
    vector = candidate.network.item_output[new].detach()
    candidate.use_ranking("approximate")
    found, _ = candidate.index.top_k(vector[None, :] * 10, 20)
    assert new in found[0].tolist()


def test_offline_evaluation_scores_what_would_be_served() -> None:
    """With every list probed, approximate evaluation equals exact evaluation."""
    log = generate(SynthSpec(sessions=300, items=200, seed=3))
    recommender, _ = train(log, CONFIG.replace(n_epochs=1), seed=0, progress=False)
    exact = evaluate(RecommenderScorer(recommender), log, ks=(5, 20))
    recommender.index = ItemIndex.build(
        recommender.network.item_output,
        recommender.network.item_bias,
        IndexParams(n_lists=4, n_probe=4, candidates=40),
    )
    recommender.use_ranking("approximate")
    approximate = evaluate(RecommenderScorer(recommender, depth=20), log, ks=(5, 20))
    assert approximate.to_dict() == pytest.approx(exact.to_dict(), abs=1e-9)
