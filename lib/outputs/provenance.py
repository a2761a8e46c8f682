"""The library versions a result was computed with."""
from __future__ import annotations

import importlib.metadata
import platform


def versions() -> dict[str, str]:
    import torch
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("datasets", "accelerate", "lm_eval"):
        try:  # metadata only: importing lm_eval just for its version would be slow
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
