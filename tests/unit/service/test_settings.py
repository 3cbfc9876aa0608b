from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.settings import Settings, from_sources


def test_defaults_are_safe() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.enable_management is False
    assert settings.management_token == "" and settings.inference_token == ""
    assert settings.tls is False and settings.tls_cert is None and settings.tls_key is None
    assert settings.backend == "auto" and settings.model_backends == {}
    assert settings.request_timeout_s == 0.0 and settings.max_payload_bytes == 16 * 1024 * 1024
    assert from_sources(flags={}, environ={}) == settings


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().host = "0.0.0.0"  # type: ignore[misc]


def test_precedence_config_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("http_port: 1\ngrpc-port: 2\nmetrics_port: 3\nhost: 10.0.0.1\n")
    environ = {"SERVE_GRPC_PORT": "20", "SERVE_METRICS_PORT": "30", "HTTP_PORT": "99", "OTHER": "x"}
    flags = {"metrics_port": "300", "host": None}  # None: the flag was not given
    settings = from_sources(flags=flags, environ=environ, config_file=config)
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (1, 20, 300)
    assert settings.host == "10.0.0.1"


def test_the_process_environment_is_read_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVE_HTTP_PORT", "8123")
    assert from_sources(flags={}).http_port == 8123
    assert from_sources(flags={}, environ={}).http_port == 8000


@pytest.mark.parametrize(
    ("field", "text", "expected"),
    [
        ("enable_management", "yes", True),
        ("enable_management", "TRUE", True),
        ("enable_management", " on ", True),
        ("enable_management", "1", True),
        ("enable_management", "0", False),
        ("enable_management", "false", False),
        ("http_port", "9000", 9000),
        ("max_queue_delay_ms", "2.5", 2.5),
        ("request_timeout_s", "3", 3.0),
        ("model_store", "/srv/models", Path("/srv/models")),
        ("model_backends", "a=onnxruntime,b=torchscript", {"a": "onnxruntime", "b": "torchscript"}),
        ("model_backends", " a = torchscript , ", {"a": "torchscript"}),
        ("model_backends", "", {}),
        ("log_level", "DEBUG", "DEBUG"),
    ],
)
def test_environment_strings_become_the_field_type(field: str, text: str, expected: object) -> None:
    environ = {f"SERVE_{field.upper()}": text, "SERVE_MANAGEMENT_TOKEN": "t"}
    value = getattr(from_sources(flags={}, environ=environ), field)
    assert value == expected and type(value) is type(expected)


def test_yaml_values_are_coerced_too(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "enable_management: true\nmanagement_token: 12345\nmax_batch_size: '4'\n"
        "model_backends: {flowers: torchscript, pets: onnxruntime}\ntls_cert: cert.pem\ntls_key: key.pem\n"
    )
    settings = from_sources(flags={}, environ={}, config_file=config)
    assert settings.enable_management is True and settings.management_token == "12345"
    assert settings.max_batch_size == 4
    assert settings.model_backends == {"flowers": "torchscript", "pets": "onnxruntime"}
    assert settings.backend_for("flowers") == "torchscript" and settings.backend_for("other") == "auto"
    assert (settings.tls_cert, settings.tls_key, settings.tls) == (Path("cert.pem"), Path("key.pem"), True)


def test_an_empty_config_file_means_defaults(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("")
    assert from_sources(flags={}, environ={}, config_file=config) == Settings()


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("- http_port\n- 1\n")
    with pytest.raises(ValueError, match="expected a mapping of setting names to values"):
        from_sources(flags={}, environ={}, config_file=config)


def test_unknown_keys_are_rejected_naming_each(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("nope: 1\nhttp_port: 1\n")
    with pytest.raises(ValueError, match=r"^unknown settings: bogus, colour, nope$"):
        from_sources(flags={"colour": "red"}, environ={"SERVE_BOGUS": "1"}, config_file=config)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SERVE_HTTP_PORT": "eighty"}, "invalid literal for int"),
        ({"SERVE_MAX_QUEUE_DELAY_MS": "soon"}, "could not convert string to float"),
        ({"SERVE_BACKEND": "tensorrt"}, "backend='tensorrt' is not one of auto, onnxruntime, openvino, torchscript"),
        ({"SERVE_MODEL_BACKENDS": "a=tensorrt"}, r"model_backends\[a\]='tensorrt' is not one of"),
        ({"SERVE_MODEL_BACKENDS": "a"}, "expected model=value"),
        ({"SERVE_MAX_BATCH_SIZE": "0"}, "must be at least 1"),
        ({"SERVE_MAX_QUEUE_SIZE": "0"}, "must be at least 1"),
        ({"SERVE_MODEL_INSTANCES": "0"}, "must be at least 1"),
        ({"SERVE_EVENT_LOOP": "trio"}, "event_loop='trio' is not one of auto, uvloop, asyncio"),
    ],
)
def test_bad_values_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_sources(flags={}, environ=environ)


def test_management_needs_a_token() -> None:
    with pytest.raises(ValueError, match="enable_management needs a management_token"):
        Settings(enable_management=True)
    with pytest.raises(ValueError, match="enable_management needs a management_token"):
        from_sources(flags={"enable_management": True}, environ={})
    settings = from_sources(flags={"enable_management": True}, environ={"SERVE_MANAGEMENT_TOKEN": "s3cret"})
    assert settings.enable_management and settings.management_token == "s3cret"


@pytest.mark.parametrize("half", [{"tls_cert": Path("cert.pem")}, {"tls_key": Path("key.pem")}])
def test_half_configured_tls_is_refused(half: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="TLS needs both tls_cert and tls_key"):
        Settings(**half)  # type: ignore[arg-type]


def test_public_dict_masks_tokens() -> None:
    settings = Settings(
        enable_management=True,
        management_token="admin-secret",
        inference_token="client-secret",
        model_store=Path("/srv/store"),
    )
    public = settings.public_dict()
    assert public["management_token"] == "***" and public["inference_token"] == "***"
    assert "secret" not in repr(public)
    assert public["model_store"] == "/srv/store" and public["tls_cert"] is None
    assert set(public) == {f.name for f in dataclasses.fields(Settings)}
    assert Settings().public_dict()["management_token"] == ""


@pytest.mark.parametrize("text", ["ture", "enabled", "y3s"])
def test_an_unrecognised_boolean_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="enable_management"):
        from_sources(flags={}, environ={"SERVE_ENABLE_MANAGEMENT": text, "SERVE_MANAGEMENT_TOKEN": "t"})
