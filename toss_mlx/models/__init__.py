"""Models: load any mlx-lm model (folder, HF folder, hub id, or a registry name), import GGUF, LoRA."""
