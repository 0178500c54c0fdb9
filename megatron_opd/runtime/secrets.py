"""API keys from the environment or a file, read when they are used and never stored in a config.

A config names where its key is (`api_key_env: NAME` or `api_key_file: PATH`), so every
config.yaml, job snapshot and sbatch script written from it holds the name, not the key.
Torch-free: the config sections (teachers, rollout) use it.
"""

from __future__ import annotations

import os
from pathlib import Path

# Why a literal key is refused in a config (REFUSED_KEYS of the sections that take a key).
LITERAL_KEY_REFUSED = (
    "a key written in a config is copied into every config.yaml and job snapshot; export it and set "
    "{prefix}api_key_env=NAME, or put it in a file only you can read and set {prefix}api_key_file=PATH"
)


class SecretError(ValueError):
    """A key's source is missing or unreadable; the message names the config key, never the secret."""


def check_key_source(env: str, file: str, *, prefix: str) -> None:
    """Refuse a key given both ways (which one would win is not obvious)."""
    if env and file:
        raise SecretError(f"{prefix}api_key_env and {prefix}api_key_file are both set; keep one")


def read_api_key(env: str, file: str, *, prefix: str) -> str:
    """The key from $`env` or from `file` (surrounding whitespace dropped); "" when neither is set."""
    check_key_source(env, file, prefix=prefix)
    if env:
        value = os.environ.get(env, "")
        if not value:
            raise SecretError(f"{prefix}api_key_env={env} but ${env} is not set (or empty) in this environment")
        return value
    if file:
        try:
            value = Path(file).expanduser().read_text().strip()
        except OSError as e:
            raise SecretError(f"{prefix}api_key_file={file} cannot be read: {e.strerror or e}") from None
        if not value:
            raise SecretError(f"{prefix}api_key_file={file} is empty")
        return value
    return ""
