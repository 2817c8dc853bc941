"""Environment switches shared by the plugins: each integration can be turned off without uninstalling."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("kda_serving.integrations")

VLLM_SWITCH = "KDA_SERVING_VLLM"
SGLANG_SWITCH = "KDA_SERVING_SGLANG"
FLA_SWITCH = "KDA_SERVING_FLA"

_OFF_VALUES = ("0", "false", "off", "no")
_logged_once: set[str] = set()


def integration_enabled(variable: str) -> bool:
    """True unless the variable is set to 0/false/off/no (case-insensitive); unset means on."""
    return os.environ.get(variable, "1").strip().lower() not in _OFF_VALUES


def framework_logger(framework: str) -> logging.Logger:
    """A logger under the framework's own logger tree ("vllm.kda_serving", "sglang.kda_serving"), so our
    messages appear wherever the framework's logging is configured to print."""
    return logging.getLogger(f"{framework}.kda_serving")


def log_once(key: str, message: str, *args, to: logging.Logger | None = None) -> None:
    """Logs `message` at INFO the first time `key` is seen in this process (e.g. which path a plugin took)."""
    if key in _logged_once:
        return
    _logged_once.add(key)
    (to or logger).info(message, *args)
