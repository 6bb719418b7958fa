"""The calibration pass and what is measured on it: activations,
similarities (CKA, block influence), fidelity of a removal set, task metrics."""
