"""Secrets kept out of what a run writes: config.yaml, the loggers' configs (W&B, CSV hparams.yaml)
and the hyper-parameters inside checkpoints.

A secret is a value under a key named like one (`hf_token`, `api_key`, `client_secret`, `password`),
or a string holding the value of an environment variable named like one (WANDB_API_KEY, HF_TOKEN,
AWS_SECRET_ACCESS_KEY...), however it got there (`${oc.env:HF_TOKEN}`, a copy in a path). Both are
written as `<redacted>`; the run itself keeps using the real value.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|passwd)$", re.IGNORECASE)  # not max_new_tokens
SECRET_ENV = re.compile(r"API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD", re.IGNORECASE)
SECRET_VALUE = re.compile(r"[^\s/]{12,}")  # long and not a path: short flags like TOKENIZERS_PARALLELISM=false stay


def secret_env_values() -> list[str]:
    """The values of this process's environment variables named like secrets."""
    return [v for k, v in os.environ.items() if SECRET_ENV.search(k) and SECRET_VALUE.fullmatch(v)]


def redacted(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` (plain dicts, lists and scalars, e.g. a resolved config) with every secret replaced."""
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, "")
                else redacted(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redacted(v, secrets) for v in value)
    if isinstance(value, str) and any(s in value for s in secrets):
        return REDACTED
    return value
