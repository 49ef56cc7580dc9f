"""ftlab: a fine-tuning lab for pretrained image classifiers (full fine-tuning, PEFT and LoRA side by side)."""

__version__ = "0.1.0"
