"""Sparse inference for pruned models: a bitmask-packed Linear with C++/OpenMP/AVX2 kernels (pure-PyTorch
fallback), whole-model conversion, and compressed checkpoints. See format.py for the layout and why."""
