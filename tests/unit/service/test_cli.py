"""``serve``'s command line: the parser, settings resolution and refusals. No server is started:
every ``main`` call here fails before it would start one."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest

from service.cli import HELP, get_args_parser, main, resolve_settings, run
from service.settings import Settings


@pytest.fixture(autouse=True)
def _no_serve_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SERVE_"):
            monkeypatch.delenv(name)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _parse(*argv: str) -> argparse.Namespace:
    return get_args_parser().parse_args(list(argv))


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert set(HELP) == set(fields)
    for field in fields:
        assert _flag(field) in text, field
    assert "--config" in text and "--no-enable-management" in text and "SERVE_" in text


def test_no_flags_means_defaults() -> None:
    assert resolve_settings(_parse()) == Settings()


def test_flags_parse_into_settings(tmp_path: Path) -> None:
    args = _parse(
        "--model-store", str(tmp_path), "--host", "0.0.0.0", "--http-port", "9000", "--grpc-port", "9001",
        "--backend", "torchscript", "--model-backends", "a=onnxruntime,b=torchscript", "--max-batch-size", "16",
        "--max-queue-delay-ms", "2.5", "--enable-management", "--management-token", "adm",
        "--tls-cert", "cert.pem", "--tls-key", "key.pem", "--log-level", "debug",
    )  # fmt: skip
    settings = resolve_settings(args)
    assert settings.model_store == tmp_path and settings.host == "0.0.0.0"
    assert (settings.http_port, settings.grpc_port, settings.max_batch_size) == (9000, 9001, 16)
    assert settings.max_queue_delay_ms == 2.5
    assert settings.backend == "torchscript"
    assert settings.model_backends == {"a": "onnxruntime", "b": "torchscript"}
    assert settings.enable_management is True and settings.management_token == "adm"
    assert settings.tls and settings.tls_cert == Path("cert.pem")
    assert settings.log_level == "debug"
    assert resolve_settings(_parse("--no-enable-management")).enable_management is False
    assert resolve_settings(_parse("--no-intra-op-spinning")).intra_op_spinning is False


def test_flags_win_over_the_environment_and_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("http-port: 1\ngrpc_port: 2\nmetrics_port: 3\n")
    monkeypatch.setenv("SERVE_GRPC_PORT", "20")
    monkeypatch.setenv("SERVE_METRICS_PORT", "30")
    settings = resolve_settings(_parse("--config", str(config), "--metrics-port", "300"))
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (1, 20, 300)


@pytest.mark.parametrize(
    ("argv", "config", "message"),
    [
        (["--http-port", "eighty"], None, "invalid literal for int"),
        (["--backend", "tensorrt"], None, "backend='tensorrt' is not one of"),
        (["--model-backends", "flowers"], None, "expected model=value"),
        (["--enable-management"], None, "enable_management needs a management_token"),
        (["--tls-cert", "cert.pem"], None, "TLS needs both tls_cert and tls_key"),
        (["--max-batch-size", "0"], None, "must be at least 1"),
        (["--drain-grace-s", "-1"], None, "drain_grace_s must be a number of seconds >= 0"),
        (["--max-connections", "0"], None, "max_connections and grpc_max_concurrent_rpcs must be at least 1"),
        (["--header-timeout-s", "0"], None, "header_timeout_s must be a number of seconds >= 0.001"),
        (["--body-timeout-s", "inf"], None, "body_timeout_s must be a number of seconds"),
        ([], "nope: 1\n", "unknown settings: nope"),
        ([], "- a list\n", "expected a mapping"),
        (["--config", "absent.yaml"], None, "No such file"),
    ],
)
def test_bad_values_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], config: str | None, message: str
) -> None:
    if config is not None:
        (tmp_path / "serve.yaml").write_text(config)
        argv = [*argv, "--config", str(tmp_path / "serve.yaml")]
    assert main(_parse(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("serve: ") and message in err


def test_a_bad_environment_value_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SERVE_BOGUS", "1")
    with pytest.raises(SystemExit) as exited:
        run([])
    assert exited.value.code == 2
    assert "unknown settings: bogus" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--bogus"], ["--http-port"], ["--no-enable-management=yes"]])
def test_argparse_refusals_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(argv)
    assert exited.value.code == 2
    assert "usage: serve" in capsys.readouterr().err


def test_a_bad_value_names_its_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_parse("--grpc-port", "9001", "--http-port", "eighty")) == 2
    assert "http_port" in capsys.readouterr().err


def test_an_unknown_log_level_is_refused() -> None:
    with pytest.raises(ValueError, match="log_level"):
        resolve_settings(_parse("--log-level", "LOUD"))


def test_the_event_loop_is_uvloop_unless_asyncio_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import sys

    import uvloop

    from service.cli import loop_factory

    assert loop_factory("auto") is uvloop.new_event_loop and loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loop_factory("auto") is None
    with pytest.raises(OSError, match="event_loop=uvloop but uvloop is not installed"):
        loop_factory("uvloop")


@pytest.mark.parametrize(
    ("argv", "ui"),
    [((), True), (("--ui",), True), (("--no-ui",), False), (("--ui", "false"), False), (("--ui", "on"), True)],
)
def test_boolean_flags_take_an_optional_value(argv: tuple[str, ...], ui: bool) -> None:
    assert resolve_settings(_parse(*argv)).ui is ui


def test_a_boolean_flag_refuses_a_value_it_cannot_read(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="ui: expected true/false"):
        resolve_settings(_parse("--ui", "maybe"))
    with pytest.raises(SystemExit):
        _parse("--no-ui", "true")
    assert "--no-ui takes no value" in capsys.readouterr().err
