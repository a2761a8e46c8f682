"""Sparse inference for pruned models: a bitmask-packed Linear with C++/OpenMP/AVX2 kernels (pure-PyTorch
fallback), whole-model conversion, and compressed checkpoints. See format.py for the layout and why.

`register()` makes transformers' ``from_pretrained`` load compressed checkpoints natively (hf_quantizer.py). It is
a call, not a side effect of ``import lib.sparse``, because it imports transformers' quantizer registry (seconds);
importing this package stays cheap. load_compressed calls it.
"""


def register() -> None:
    """Register the "atp_sparse" quantization method with transformers (idempotent); after it,
    ``AutoModelForCausalLM.from_pretrained(compressed_dir)`` returns the model with SparseLinear modules."""
    from ..versions import check_versions
    check_versions()  # before the quantizer module, which imports what older releases lack
    from .hf_quantizer import register as _register
    _register()
