"""OpenAI-compatible HTTP server for a base model and its LoRA adapters (`lorasft serve`)."""

ENGINES = ("auto", "transformers", "llama.cpp", "vllm")
DEFAULT_MAX_QUEUE = 32  # requests waiting for a slot before the server answers 503
