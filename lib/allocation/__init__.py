"""Layer-wise sparsity allocations: one module per rule (each registers itself in RULES), the absorption
correction, and `allocate`, the one route from a spec to per-block sparsities."""
