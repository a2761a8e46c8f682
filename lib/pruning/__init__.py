"""Pruners: one module per pruner (each registers itself in PRUNERS), mask selection, the SparseGPT solver, and
the block-by-block walk that feeds them."""
