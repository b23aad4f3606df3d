"""The README's operator and layer examples run as written (the integration examples need downloads)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
OFFLINE = [b for b in BLOCKS if "from_pretrained" not in b]


def test_readme_has_offline_examples():
    assert len(OFFLINE) >= 2, "the README lost its operator or layer example"


@pytest.mark.parametrize("code", OFFLINE, ids=[f"block{i}" for i in range(len(OFFLINE))])
def test_readme_example(code):
    exec(compile(code, str(README), "exec"), {})
