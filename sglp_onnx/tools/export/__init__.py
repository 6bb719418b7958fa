"""Exporting torch and Hugging Face models to ONNX."""
