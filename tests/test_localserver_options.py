"""The local server's options are declared once (pipeline/localserver/options.py): a config's
[local] section, `pipeline serve-local`'s flags and ServerOptions all take them from there, so a
value is checked, and refused with the same words, whichever way it comes in."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, LocalConfig, declarations, load_config
from pipeline.localserver.arguments import add_serve_arguments
from pipeline.localserver.options import LocalOptions, ServerOptions
from pipeline.localserver.serve import _options
from pipeline.settings import declared


def serve_local(*argv: str) -> ServerOptions:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return _options(parser.parse_args(argv))


def test_the_local_section_is_the_servers_declaration() -> None:
    assert LocalConfig is LocalOptions
    server = {option.name for option in declared(ServerOptions)}
    assert set(declarations("local")) <= server
    assert {"host", "port", "api_key", "answer_log"}.isdisjoint(declarations("local"))


def test_every_option_has_a_flag_and_its_declared_default() -> None:
    assert serve_local() == ServerOptions()
    for option in declared(ServerOptions):
        assert getattr(ServerOptions(), option.name) == option.default, option.name
    given = serve_local(
        "--credit-budget", "2.5", "--inline-limit-mb", "1.5", "--fault-kinds", "hang, http_500"
    )
    assert given.credit_budget_usd == 2.5
    assert given.inline_limit_bytes == 3 * 2**19
    assert given.fault_kinds == ("hang", "http_500")
    assert serve_local("--implicit-cache").implicit_cache is True  # a switch, off by default


def test_implicit_cache_is_a_switch_in_a_config_too(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("[local]\nimplicit_cache = true\n")
    assert load_config(path).local.implicit_cache is True
    path.write_text('[local]\nimplicit_cache = "yes"\n')
    with pytest.raises(
        ConfigError, match=re.escape("[local] implicit_cache must be true or false")
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fault_rate", 2, "fault_rate must be within [0, 1], got 2"),
        ("latency_ms", -1, "latency_ms must be >= 0, got -1"),
        ("rpm", -3, "rpm must be a positive integer or None, got -3"),
        ("credit_budget_usd", -1, "credit_budget_usd must be >= 0 or None, got -1"),
        ("batch_max_jobs", 0, "batch_max_jobs must be positive, got 0"),
    ],
)
def test_a_bad_value_is_refused_alike_by_config_flag_and_python(
    tmp_path: Path, key: str, value: int, message: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(f"[local]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=re.escape(f"[local] {message}")):
        load_config(path)
    flag_name = "--credit-budget" if key == "credit_budget_usd" else "--" + key.replace("_", "-")
    with pytest.raises(ValueError, match=re.escape(message)):  # a float flag: "got -1.0"
        serve_local(flag_name, str(value))
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerOptions(**{key: value})


def test_zero_means_no_limit_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("[local]\nrpm = 0\ndecode_limit = 0\n")
    local = load_config(path).local
    assert (local.rpm, local.decode_limit) == (None, None)
    assert serve_local("--rpm", "0").rpm is None
    assert ServerOptions(batch_enqueued_tokens=0).batch_enqueued_tokens is None


def test_the_key_is_never_shown() -> None:
    with pytest.raises(ValueError) as refused:
        ServerOptions(api_key="")
    assert str(refused.value) == "api_key must be None (accept any key) or a non-empty string"
    assert "secret" not in repr(ServerOptions(api_key="secret"))
    assert dataclasses.replace(ServerOptions(api_key="secret"), port=5).api_key == "secret"
