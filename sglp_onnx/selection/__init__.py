"""Choosing what to remove: the budget, the criteria (one file each), and
SGLP's Fisher segmentation and per-segment allocation."""
