"""Prune a causal LM with a layer-wise sparsity allocation (ATP, ICML 2025, and others); see README.md."""
import sys

from lib.cli import main

if __name__ == "__main__":
    sys.exit(main())
