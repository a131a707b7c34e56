"""Merge, GGUF, Ollama and verification of a finished run (`lorasft merge / export / verify`)."""

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""`lorasft merge --method`: linear is lorasft's exact weighted sum of the adapters' deltas; the
others are PEFT's `add_weighted_adapter` combinations (cat: the same sum as one adapter of the
ranks added; svd: that sum cut to a rank; ties, dare_*, magnitude_prune: pruned at `density`)."""
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
"""The METHODS that prune each adapter's delta (`--density`)."""
