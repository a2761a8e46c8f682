"""Whether the HuggingFace hub can be asked at all, decided in seconds (the hub clients retry for much longer)."""
from __future__ import annotations

import os
import urllib.error
import urllib.request


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0, offline_env: tuple[str, ...] = ("HF_HUB_OFFLINE",)) -> bool:
    """False when one of `offline_env` is set or the hub does not answer within `timeout` seconds."""
    if any(_truthy(os.environ.get(name)) for name in offline_env):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/models/gpt2", method="HEAD"),
                               timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # an answer, even an error status, means the hub is there
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True
