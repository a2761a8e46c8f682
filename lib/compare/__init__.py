"""Side-by-side comparisons of allocations and pruners on one loaded model."""
