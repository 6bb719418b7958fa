"""Every ```python block of README.md and docs/*.md runs, so the examples
cannot rot. Blocks of one file run in order in one namespace (a later block
may use an earlier one's names), in a scratch working directory where
`models/` is the repository's models folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MODEL_FILE = re.compile(r"models/[\w.-]+\.(?:onnx|npz|pt|safetensors)")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def documents_with_examples() -> list[Path]:
    return [p for p in DOCUMENTS if p.is_file() and python_blocks(p)]


def test_fence_parser_finds_blocks_and_line_numbers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```python\na = 1\n```\n```console\n$ ls\n```\n```python title\nb = a + 1\n```\n")
    assert python_blocks(doc) == [(3, "a = 1\n"), (9, "b = a + 1\n")]


def test_the_api_example_is_documented():
    assert ROOT / "docs" / "analysis.md" in documents_with_examples()


@pytest.mark.parametrize("document", documents_with_examples(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_examples_run(document, tmp_path, monkeypatch):
    blocks = python_blocks(document)
    needed = sorted({m for _, code in blocks for m in MODEL_FILE.findall(code)})
    missing = [m for m in needed if not (ROOT / m).is_file()]
    if missing:
        pytest.skip(f"example needs {', '.join(missing)}, not built yet")
    (tmp_path / "models").symlink_to(ROOT / "models", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # `models.resnet_cifar:...` factories
    namespace: dict = {"__name__": "__main__"}
    for line, code in blocks:
        # Pad so tracebacks point at the line in the Markdown file.
        exec(compile("\n" * (line - 1) + code, str(document), "exec"), namespace)
