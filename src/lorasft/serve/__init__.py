"""OpenAI-compatible HTTP server for a base model and its LoRA adapters (`lorasft serve`)."""
