"""Interoperability with other ecosystems' checkpoints (Hugging Face)."""
