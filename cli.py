"""Thin launcher so `python cli.py ...` works from a checkout; the console
script `sglp-onnx` (sglp_onnx.cli:main) is the real entry point."""

import sys

from sglp_onnx.cli import main

if __name__ == "__main__":
    sys.exit(main())
