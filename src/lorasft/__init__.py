"""lorasft: LoRA instruction fine-tuning, correct by default."""

__version__ = "0.1.0"
