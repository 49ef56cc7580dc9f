"""DoRA: LoRA plus a trainable per-output-channel magnitude times the normalised direction of W + ΔW."""

from ftlab.methods.lora import LoRA


class DoRA(LoRA):
    method = "dora"
    dora = True
