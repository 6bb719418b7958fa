"""Writing a removal into the graph: the one bypass (the gated graph), the
removal itself, KV-cache bookkeeping, and the validation gate."""
