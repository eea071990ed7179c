"""Serving PSOFT adapters through vLLM's multi-LoRA engine."""
