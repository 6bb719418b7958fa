"""Commands beside compress: the latency bench, fine-tuning and export (the
metrics of `sglp-onnx eval` live in `evidence.metrics`)."""
