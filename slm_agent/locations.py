"""Where slm-agent keeps its state.

One environment variable, ``SLM_AGENT_HOME``, moves everything (config, tasks, model store,
trace database) under one folder; without it the platform's user config and data dirs are used.
Tests point it at a temporary folder so they never touch a user's files.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "slm-agent"


def home() -> Path | None:
    value = os.environ.get("SLM_AGENT_HOME")
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    root = home()
    return root / "config" if root else Path(platformdirs.user_config_dir(APP_NAME))


def data_dir() -> Path:
    root = home()
    return root / "data" if root else Path(platformdirs.user_data_dir(APP_NAME))


def config_file() -> Path:
    return config_dir() / "config.toml"


def tasks_dir() -> Path:
    return config_dir() / "tasks"


def default_store_dir() -> Path:
    return data_dir() / "models"


def default_db_path() -> Path:
    return data_dir() / "traces.db"
