"""The graph as data: an index of producers, consumers and constants, the op
tables, ONNX Runtime sessions, and FLOPs and parameter counts."""
