"""Converters from PSOFT factors to deployable artifacts (merge, LoRA, ONNX) and their verification."""
