"""One-line description of the machine a benchmark ran on, for result files."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import onnxruntime
        import torch

        versions = f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}"
    except ImportError:  # pragma: no cover - benchmarks run in the project venv
        versions = ""
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}, {versions}"


def publish(lines: list[str], path) -> str:
    """Write a result file (markdown lines) and echo it; returns the text."""
    from pathlib import Path

    text = "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)
    return text
