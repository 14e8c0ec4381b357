"""The README's Python example runs as printed (from a directory holding the recipes)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path):
    """The example runs as printed, in its own interpreter (a file written from the README, no exec here)."""
    import subprocess
    import sys

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 6  # the 5-line API example (plus a blank line)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    script = tmp_path / "example.py"
    script.write_text(example.replace('["privacy.epsilon=4"]', '["privacy.epsilon=4", "training.epochs=2"]'))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    eps, auroc = map(float, done.stdout.split()[-2:])
    assert 3.9 < eps <= 4.0 and 0.3 < auroc < 1.0
    assert (tmp_path / "runs" / "actg-eps4" / "private" / "record.json").exists()


def test_bring_your_own_data_snippets_are_valid_recipe_sections():
    import yaml

    from dptrain.config import DataConfig

    section = (ROOT / "README.md").read_text().split("## Bring your own data", 1)[1].split("\n## ", 1)[0]
    docs = [d for block in re.findall(r"```yaml\n(.*?)```", section, flags=re.S) for d in yaml.safe_load_all(block)]
    assert len(docs) == 3
    for doc in docs:
        DataConfig.model_validate(doc["data"])
