"""Sparse inference: pruned Linear weights held compressed, fast kernels, compressed checkpoints."""
