"""The oldest transformers and torch this tool works with, checked before any work: by the CLI (main.py) and by
`lib.sparse.register()`, so an older one gives one clear line instead of failures deep inside a load.

The transformers floor is the oldest release the whole test suite was run on (5.10.4: all but two tests of a randomly
initialised ERNIE-4.5-MoE, whose router transformers initialises to zeros before 5.23; INSTALL.md says more);
5.0 and 4.57 fail broadly (5.0's fused experts lack `has_gate` and its quantizer hooks differ; 4.x keeps experts as
separate modules and has other tokenizer classes). requirements.txt and pyproject.toml state the same floor.

The torch floor is transformers' own: below 2.6 transformers 5 disables torch with a logged warning and every model
class then fails far from the cause. The oldest torch the test suite was run on is MIN_TORCH (INSTALL.md)."""
from __future__ import annotations

from .errors import UserError

MIN_TRANSFORMERS = "5.10"
MIN_TORCH = "2.6"


def installed_transformers() -> str:
    import transformers
    return transformers.__version__


def installed_torch() -> str:
    import torch
    return torch.__version__


def _check_floor(package: str, found: str, floor: str) -> None:
    from packaging.version import Version

    if Version(found).release < Version(floor).release:
        raise UserError(f"{package} {found} is older than this tool needs ({floor} or later): "
                        f"pip install -U '{package}>={floor}'")


def check_transformers(found: str | None = None) -> None:
    """UserError when the installed transformers (or `found`) is older than MIN_TRANSFORMERS."""
    _check_floor("transformers", installed_transformers() if found is None else found, MIN_TRANSFORMERS)


def check_torch(found: str | None = None) -> None:
    """UserError when the installed torch (or `found`) is older than MIN_TORCH."""
    _check_floor("torch", installed_torch() if found is None else found, MIN_TORCH)


def check_versions() -> None:
    """Both floors, torch first (an older torch is what makes transformers fail)."""
    check_torch()
    check_transformers()
