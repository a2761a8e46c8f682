"""The oldest transformers this tool works with, checked before any work: by the CLI (main.py) and by
`lib.sparse.register()`, so an older one gives one clear line instead of failures deep inside a load.

The floor is the oldest release the whole test suite was run on (5.10.4: all but two tests of a randomly
initialised ERNIE-4.5-MoE, whose router transformers initialises to zeros before 5.23; INSTALL.md says more);
5.0 and 4.57 fail broadly (5.0's fused experts lack `has_gate` and its quantizer hooks differ; 4.x keeps experts as
separate modules and has other tokenizer classes). requirements.txt and pyproject.toml state the same floor."""
from __future__ import annotations

from .errors import UserError

MIN_TRANSFORMERS = "5.10"


def installed_transformers() -> str:
    import transformers
    return transformers.__version__


def check_transformers(found: str | None = None) -> None:
    """UserError when the installed transformers (or `found`) is older than MIN_TRANSFORMERS."""
    from packaging.version import Version

    if found is None:
        found = installed_transformers()
    if Version(found).release < Version(MIN_TRANSFORMERS).release:
        raise UserError(f"transformers {found} is older than this tool needs ({MIN_TRANSFORMERS} or later): "
                        f"pip install -U 'transformers>={MIN_TRANSFORMERS}'")
