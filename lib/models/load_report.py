"""transformers' load report checked: a checkpoint whose weights do not match its model is refused."""
from __future__ import annotations

from ..errors import UserError


def check_loading_info(name: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not match its model: transformers would initialise a missing weight
    at random (and drop an unexpected one), and the run would report a plausible but meaningless perplexity."""
    problems = []
    for kind in ("missing", "unexpected", "mismatched"):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(f"{kind}_keys") or ())
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {kind} weight(s) ({shown})")
    if problems:
        raise UserError(f"{name}: the checkpoint does not match its model: {'; '.join(problems)}. Refusing to run "
                        f"with weights transformers would initialise at random", "model")
