"""Placeholder replaced by the compressed-checkpoint implementation."""
from ..errors import UserError


def check_compressed_support() -> None:
    raise UserError("compressed checkpoints are not available in this build", "save_format")
