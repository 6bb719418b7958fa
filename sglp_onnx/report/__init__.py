"""The report: building it, printing it, its JSON Schema, and its plots."""
