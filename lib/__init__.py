"""Layer-wise sparsity for LLMs: allocation rules, pruners and the sequential pruning pipeline."""
