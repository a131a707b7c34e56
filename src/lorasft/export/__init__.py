"""Merge, GGUF, Ollama and verification of a finished run (`lorasft merge / export / verify`)."""

FACTOR_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
"""PEFT's pruning combinations applied to each adapter's A and B factors separately (rank x width
matrices), then summed: the same rank, no SVD."""
DELTA_PRUNING = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
"""The same pruning applied to each adapter's whole delta B @ A (as the TIES and DARE papers do on
full weights), then cut back to a LoRA by SVD."""
PRUNING = FACTOR_PRUNING + DELTA_PRUNING
"""The METHODS that prune (`--density`: the share of the entries kept)."""
METHODS = ("linear", "cat", "svd", *PRUNING)
"""`lorasft merge --method`: linear is lorasft's exact weighted sum of the adapters' deltas; the
others are PEFT's `add_weighted_adapter` combinations (cat: the same sum as one adapter of the
ranks added; svd: that sum cut to a rank by SVD; the PRUNING ones at `density`)."""

WRITTEN = ("f32", "f16", "q8_0")
"""GGUF types lorasft writes itself (gguf-py's writer and quantizer)."""
QUANTIZE = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
"""GGUF types llama.cpp's own `llama-quantize` makes from lorasft's f32 file (its names): the
k-quants choose a type per tensor, and a tensor whose rows do not split into 256-value blocks
falls back to a 32-block type (llama.cpp's rule; SmolLM2-135M's 576-wide rows are such)."""
GGUF_TYPES = (*WRITTEN, *QUANTIZE)
"""`lorasft export --type` and `lorasft serve --gguf-type`."""
