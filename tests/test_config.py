"""Settings precedence (default < file < env < CLI) and `slm-agent config show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from slm_agent import locations
from slm_agent.cli import main as cli
from slm_agent.runtime.config import load_settings, value_sources


def write_config(text: str) -> Path:
    path = locations.config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_loopback_and_bundled(_isolated_home: Path) -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1" and settings.port == 8765
    assert settings.model == "gemma-3-270m-q4_k_m"
    assert settings.n_threads >= 1
    assert settings.db_path == _isolated_home / "data" / "traces.db"


def test_precedence_file_env_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    write_config("port = 9001\nn_ctx = 1024\nqueue_size = 3\n")
    monkeypatch.setenv("SLM_AGENT_N_CTX", "3072")
    settings = load_settings(queue_size=7)
    assert (settings.port, settings.n_ctx, settings.queue_size) == (9001, 3072, 7)
    sources = value_sources(settings, {"queue_size": 7})
    assert sources["port"].startswith("file") and sources["n_ctx"] == "env" and sources["queue_size"] == "cli"
    assert sources["host"] == "default"


def test_token_required_beyond_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="set a token"):
        load_settings(host="0.0.0.0")
    monkeypatch.setenv("SLM_AGENT_TOKEN", "t0ken")
    assert load_settings(host="0.0.0.0").token is not None


def test_bad_config_file_is_a_clear_error() -> None:
    path = write_config("port = [unclosed\n")
    with pytest.raises(ValueError, match=f"config file {path} is not valid TOML"):
        load_settings()


def test_config_show_masks_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_AGENT_TOKEN", "very-secret")
    result = CliRunner().invoke(cli, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["token"] == {"value": "********", "source": "env"}
    assert "very-secret" not in result.output
    table = CliRunner().invoke(cli, ["config", "show"])
    assert "n_ctx" in table.output and "Context window" in table.output


def test_every_setting_has_a_daemon_flag() -> None:
    from slm_agent.runtime.config import Settings
    from slm_agent.runtime.daemon import main as daemon_main

    flags = {p.name for p in daemon_main.params}
    assert set(Settings.model_fields) - {"remote", "sync", "traces"} <= flags
    result = CliRunner().invoke(daemon_main, ["--n-ctx", "not-a-number"])
    assert result.exit_code == 2 and "not a valid integer" in result.output
    bad = CliRunner().invoke(daemon_main, ["--host", "0.0.0.0", "--port", "0"])
    assert bad.exit_code == 1 and "set a token" in bad.output
