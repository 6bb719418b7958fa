"""The torch model paired with the ONNX graph: loading it, matching its
modules to units, and GradNorm."""
