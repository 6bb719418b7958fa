"""Reading and writing files: ONNX models (external data, untrusted paths,
atomic all-or-nothing outputs) and calibration sets."""
