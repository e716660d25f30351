"""WorkerSettings: flag > environment > default, and one clear UserError per bad value."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from model.errors import UserError
from stream.serving.settings import ENV_PREFIX, WorkerSettings


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    path = tmp_path / "model"
    path.mkdir()
    return str(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worker")
    WorkerSettings.add_arguments(p)
    return p


def load(argv: list[str], environ: dict[str, str] | None = None) -> WorkerSettings:
    return WorkerSettings.from_args(parser().parse_args(argv), environ=environ or {})


def user_error(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load(argv, environ)
    message = str(info.value)
    assert "\n" not in message  # one clear line
    return message


def test_defaults(model_dir: str) -> None:
    settings = load(["--model", model_dir])
    assert settings == WorkerSettings(model=model_dir)
    for f in dataclasses.fields(WorkerSettings):
        if f.name != "model":
            assert getattr(settings, f.name) == f.default, f.name
    assert settings.bootstrap == "127.0.0.1:9092"


def test_every_setting_has_a_flag(model_dir: str) -> None:
    help_text = parser().format_help()
    for f in dataclasses.fields(WorkerSettings):
        assert "--" + f.name.replace("_", "-") in help_text
        assert ENV_PREFIX + f.name.upper() in help_text


def test_environment_overrides_defaults(model_dir: str, tmp_path: Path) -> None:
    environ = {
        "STREAMREC_MODEL": model_dir,
        "STREAMREC_TOP_N": "7",
        "STREAMREC_BATCH_MS": "2.5",
        "STREAMREC_CREATE_TOPICS": "false",
        "STREAMREC_BROKER": "kafka://broker-1:9093",
        "STREAMREC_LOG_LEVEL": "debug",
        "STREAMREC_DATA_DIR": str(tmp_path / "faust"),
        "STREAMREC_WEB_PORT": "0",
        "UNRELATED_TOP_N": "99",
        "TOP_N": "99",
    }
    settings = load([], environ)
    assert settings.model == model_dir
    assert settings.top_n == 7 and isinstance(settings.top_n, int)
    assert settings.batch_ms == 2.5
    assert settings.create_topics is False
    assert settings.broker == "kafka://broker-1:9093"
    assert settings.bootstrap == "broker-1:9093"
    assert settings.log_level == "debug"
    assert settings.web_port == 0
    assert settings.faust_data_dir == tmp_path / "faust" / "streamrec"
    assert settings.partitions == 4  # untouched settings keep their defaults


def test_flags_override_environment(model_dir: str, tmp_path: Path) -> None:
    other = tmp_path / "other-model"
    other.mkdir()
    environ = {
        "STREAMREC_MODEL": str(other),
        "STREAMREC_TOP_N": "7",
        "STREAMREC_CREATE_TOPICS": "false",
        "STREAMREC_PARTITIONS": "not-even-a-number",
        "STREAMREC_APP_ID": "from-env",
    }
    settings = load(
        [
            "--model",
            model_dir,
            "--top-n",
            "5",
            "--create-topics",
            "yes",
            "--partitions",
            "8",
            "--app-id",
            "from-flag",
        ],
        environ,
    )
    assert settings.model == model_dir
    assert settings.top_n == 5
    assert settings.create_topics is True
    assert settings.partitions == 8  # a bad env value is never even parsed when a flag wins
    assert settings.app_id == "from-flag"


def test_flag_equal_to_the_default_still_beats_the_environment(model_dir: str) -> None:
    settings = load(["--model", model_dir, "--top-n", "20"], {"STREAMREC_TOP_N": "7"})
    assert settings.top_n == 20


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_bool_spellings(model_dir: str, raw: str, expected: bool) -> None:
    assert load(["--model", model_dir], {"STREAMREC_CREATE_TOPICS": raw}).create_topics is expected
    assert load(["--model", model_dir, "--create-topics", raw]).create_topics is expected


def test_from_args_reads_os_environ_by_default(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_MODEL", model_dir)
    monkeypatch.setenv("STREAMREC_TOP_N", "3")
    settings = WorkerSettings.from_args(parser().parse_args([]))
    assert (settings.model, settings.top_n) == (model_dir, 3)


def test_replace_revalidates(model_dir: str) -> None:
    settings = load(["--model", model_dir])
    assert settings.replace(top_n=3).top_n == 3
    with pytest.raises(UserError, match="top_n"):
        settings.replace(top_n=0)


# ------------------------------------------------------------------------- invalid values


@pytest.mark.parametrize(
    "broker",
    [
        "http://localhost:9092",
        "localhost",
        "kafka://host:0",
        "kafka://host:99999",
        "host:port",
        "",
        "a:1,,b:2",
        "kafka://bad host:9092",
    ],
)
def test_bad_broker_url(model_dir: str, broker: str) -> None:
    assert "broker" in user_error(["--model", model_dir, "--broker", broker])
    assert "broker" in user_error(["--model", model_dir], {"STREAMREC_BROKER": broker})


@pytest.mark.parametrize(
    "argv,setting",
    [
        (["--partitions", "0"], "partitions"),
        (["--partitions", "-3"], "partitions"),
        (["--top-n", "-1"], "top_n"),
        (["--top-n", "0"], "top_n"),
        (["--batch-size", "0"], "batch_size"),
        (["--batch-ms", "0"], "batch_ms"),
        (["--session-timeout-s", "-1"], "session_timeout_s"),
        (["--expiry-interval-s", "0"], "expiry_interval_s"),
        (["--torch-threads", "0"], "torch_threads"),
        (["--web-port", "70000"], "web_port"),
        (["--web-port", "-1"], "web_port"),
        (["--fetch-max-wait-ms", "-1"], "fetch_max_wait_ms"),
        (["--group-session-timeout-s", "5"], "group_session_timeout_s"),
        (["--group-session-timeout-s", "301"], "group_session_timeout_s"),
        (["--log-level", "loud"], "log_level"),
        (["--log-level", "INFO"], "log_level"),
        (["--input-topic", ""], "input_topic"),
        (["--output-topic", ""], "output_topic"),
        (["--dlq-topic", ""], "dlq_topic"),
        (["--app-id", ""], "app_id"),
    ],
)
def test_invalid_value_names_the_setting(model_dir: str, argv: list[str], setting: str) -> None:
    assert setting in user_error(["--model", model_dir, *argv])


def test_log_level_from_environment(model_dir: str) -> None:
    message = user_error(["--model", model_dir], {"STREAMREC_LOG_LEVEL": "loud"})
    assert "log_level" in message and "loud" in message


def test_missing_model(model_dir: str) -> None:
    assert "model" in user_error([])
    assert "model" in user_error([], {"STREAMREC_MODEL": ""})


def test_nonexistent_model_dir(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    message = user_error(["--model", missing])
    assert "model" in message and missing in message


def test_model_path_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "model.pt"
    file.write_text("not a directory")
    assert "model" in user_error(["--model", str(file)])


@pytest.mark.parametrize(
    "name,raw",
    [
        ("PARTITIONS", "four"),
        ("TOP_N", "2.5"),
        ("TOP_N", ""),
        ("WEB_PORT", "80a"),
        ("BATCH_MS", "fast"),
        ("CREATE_TOPICS", "maybe"),
        ("CREATE_TOPICS", ""),
    ],
)
def test_bad_environment_value_names_the_setting(model_dir: str, name: str, raw: str) -> None:
    message = user_error(["--model", model_dir], {ENV_PREFIX + name: raw})
    assert ENV_PREFIX + name in message
    assert name.lower() in message.lower()
    assert repr(raw) in message


@pytest.mark.parametrize(
    "argv", [["--create-topics", "maybe"], ["--partitions", "four"], ["--batch-ms", "fast"]]
)
def test_bad_flag_value_is_an_argparse_error_naming_the_flag(
    model_dir: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["--model", model_dir, *argv])
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["batch_ms", "session_timeout_s", "expiry_interval_s"])
def test_nan_float_setting_is_rejected(model_dir: str, setting: str) -> None:
    flag = "--" + setting.replace("_", "-")
    assert setting in user_error(["--model", model_dir, flag, "nan"])
