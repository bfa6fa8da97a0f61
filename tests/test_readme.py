"""The README's usage example runs as written (the operators it calls: docs/operators.md,
"sinkhorn_loss" and "chamfer_loss"; the creation layer: "Creation modules")."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the documented reference fallback
        exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["loss"].isfinite() and namespace["x"].shape[-1] == 3
