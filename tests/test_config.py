"""GRU4RecConfig: published defaults, validation messages, parsing and serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from model.config import LOSSES, GRU4RecConfig
from model.errors import UserError


def test_defaults_are_the_published_setting() -> None:
    config = GRU4RecConfig()
    assert config.loss == "cross-entropy"
    assert config.logq == 1.0
    assert config.constrained_embedding is True
    assert config.embedding == 0
    assert config.layers == (100,)
    assert config.batch_size == 32
    assert config.dropout_p_hidden == 0.4
    assert config.dropout_p_embed == 0.0
    assert config.learning_rate == 0.2
    assert config.momentum == 0.2
    assert config.n_sample == 2048
    assert config.sample_alpha == 0.5
    assert config.n_epochs == 10


def test_config_is_immutable_and_replace_validates() -> None:
    config = GRU4RecConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.loss = "bpr"  # type: ignore[misc]
    assert config.replace(n_epochs=3).n_epochs == 3
    assert config.n_epochs == 10
    with pytest.raises(UserError, match="n_epochs"):
        config.replace(n_epochs=0)


@pytest.mark.parametrize(
    ("pair", "name", "allowed"),
    [
        ("loss=foo", "loss", list(LOSSES)),
        ("layers=0", "layers", ["positive"]),
        ("layers=100,0", "layers", ["positive"]),
        ("dropout_p_hidden=1.5", "dropout_p_hidden", ["[0, 1)"]),
        ("dropout_p_embed=-0.1", "dropout_p_embed", ["[0, 1)"]),
        ("momentum=1", "momentum", ["[0, 1)"]),
        ("sample_alpha=2", "sample_alpha", ["[0, 1]"]),
        ("logq=1.5", "logq", ["[0, 1]"]),
        ("batch_size=0", "batch_size", [">= 1"]),
        ("learning_rate=0", "learning_rate", ["> 0"]),
        ("n_epochs=0", "n_epochs", [">= 1"]),
        ("n_sample=-1", "n_sample", [">= 0"]),
    ],
)
def test_invalid_values_name_parameter_and_allowed_values(
    pair: str, name: str, allowed: list[str]
) -> None:
    with pytest.raises(UserError) as info:
        GRU4RecConfig.from_strings([pair])
    message = str(info.value)
    assert name in message
    for text in allowed:
        assert text in message, f"{text!r} missing from {message!r}"


@pytest.mark.parametrize(
    ("pair", "name", "type_name"),
    [
        ("batch_size=abc", "batch_size", "int"),
        ("n_sample=1.5", "n_sample", "int"),
        ("learning_rate=fast", "learning_rate", "float"),
        ("layers=100,x", "layers", "tuple"),
        ("constrained_embedding=maybe", "constrained_embedding", "bool"),
    ],
)
def test_non_numeric_value_names_parameter_and_type(pair: str, name: str, type_name: str) -> None:
    with pytest.raises(UserError) as info:
        GRU4RecConfig.from_strings([pair])
    message = str(info.value)
    assert name in message
    assert type_name in message
    assert pair.split("=", 1)[1] in message


def test_unknown_key_is_an_error_listing_known_keys() -> None:
    with pytest.raises(UserError) as info:
        GRU4RecConfig.from_strings(["hidden_size=100"])
    message = str(info.value)
    assert "hidden_size" in message
    for known in ("layers", "loss", "n_sample", "learning_rate"):
        assert known in message


def test_pair_without_equals_sign_is_an_error() -> None:
    with pytest.raises(UserError, match="KEY=VALUE"):
        GRU4RecConfig.from_strings(["layers"])


def test_embedding_conflicts_with_constrained_embedding() -> None:
    with pytest.raises(UserError, match="embedding"):
        GRU4RecConfig(embedding=8)
    assert GRU4RecConfig(embedding=8, constrained_embedding=False).embedding == 8


def test_constructor_validates_too() -> None:
    with pytest.raises(UserError, match="loss"):
        GRU4RecConfig(loss="softmax")
    with pytest.raises(UserError, match="layers"):
        GRU4RecConfig(layers=())


def test_from_strings_parses_values_onto_defaults() -> None:
    config = GRU4RecConfig.from_strings(["layers=100,50", "loss=bpr-max"])
    assert config.layers == (100, 50)
    assert config.loss == "bpr-max"
    assert config == GRU4RecConfig(layers=(100, 50), loss="bpr-max")


def test_from_strings_parses_every_type() -> None:
    config = GRU4RecConfig.from_strings(
        [
            "layers=64",
            "batch_size=16",
            "learning_rate=0.05",
            "constrained_embedding=false",
            "embedding=32",
            " n_sample = 128 ",
        ]
    )
    assert config.layers == (64,)
    assert config.batch_size == 16 and isinstance(config.batch_size, int)
    assert config.learning_rate == 0.05
    assert config.constrained_embedding is False
    assert config.embedding == 32
    assert config.n_sample == 128
    assert GRU4RecConfig.from_strings(["constrained_embedding=1"]).constrained_embedding is True


def test_from_strings_applies_onto_a_base() -> None:
    base = GRU4RecConfig(loss="bpr", n_epochs=3)
    config = GRU4RecConfig.from_strings(["batch_size=8"], base=base)
    assert (config.loss, config.n_epochs, config.batch_size) == ("bpr", 3, 8)


@pytest.mark.parametrize(
    "config",
    [
        GRU4RecConfig(),
        GRU4RecConfig(
            loss="top1-max",
            layers=(64, 32),
            batch_size=7,
            dropout_p_embed=0.25,
            n_sample=0,
            constrained_embedding=False,
            embedding=12,
            bpreg=0.5,
            logq=0.0,
            n_epochs=2,
        ),
    ],
)
def test_to_dict_from_dict_round_trip(config: GRU4RecConfig) -> None:
    data = config.to_dict()
    assert GRU4RecConfig.from_dict(data) == config
    # it is what artifacts store: it must survive JSON too
    assert GRU4RecConfig.from_dict(json.loads(json.dumps(data))) == config
    assert set(data) == {f.name for f in dataclasses.fields(GRU4RecConfig)}


def test_from_dict_rejects_unknown_keys() -> None:
    data = GRU4RecConfig().to_dict()
    data["dropout"] = 0.1
    with pytest.raises(UserError, match="dropout"):
        GRU4RecConfig.from_dict(data)


def test_from_dict_validates_values() -> None:
    data = GRU4RecConfig().to_dict()
    data["loss"] = "hinge"
    with pytest.raises(UserError, match="loss"):
        GRU4RecConfig.from_dict(data)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("layers", 100, ("layers", "list of")),
        ("layers", ["100"], ("layers", "list of")),
        ("layers", [True], ("layers", "list of")),
        ("batch_size", "32", ("batch_size", "int")),
        ("batch_size", 32.5, ("batch_size", "int")),
        ("batch_size", True, ("batch_size", "int")),
        ("learning_rate", "0.1", ("learning_rate", "float")),
        ("learning_rate", float("inf"), ("learning_rate", "finite")),
        ("init_scale", float("nan"), ("init_scale", "finite")),
        ("init_scale", 10**400, ("init_scale", "finite")),
        ("nesterov", "yes", ("nesterov", "bool")),
        ("loss", 3, ("loss", "str")),
    ],
)
def test_from_dict_refuses_wrong_types_as_user_errors(
    key: str, value: object, words: tuple[str, ...]
) -> None:
    # What a tampered or hand-edited config.json holds (json.loads reads NaN and Infinity).
    data = json.loads(json.dumps({**GRU4RecConfig().to_dict(), key: value}))
    with pytest.raises(UserError) as info:
        GRU4RecConfig.from_dict(data)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_from_dict_refuses_a_config_that_is_not_an_object() -> None:
    with pytest.raises(UserError, match="object"):
        GRU4RecConfig.from_dict([["layers", [100]]])  # type: ignore[arg-type]


def test_from_dict_accepts_integers_for_floats() -> None:
    data = {**GRU4RecConfig().to_dict(), "learning_rate": 1, "init_scale": 2}
    assert GRU4RecConfig.from_dict(data) == GRU4RecConfig(learning_rate=1.0, init_scale=2.0)
