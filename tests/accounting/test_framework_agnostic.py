"""`accounting` must import with torch and jax unavailable (DESIGN: framework-agnostic)."""

import json
import subprocess
import sys

BLOCKER = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'jax', 'jaxlib', 'flax', 'optax', 'opacus', 'tensorflow'}:
            raise ImportError(f'blocked import of {name}')
        return None
sys.meta_path.insert(0, Block())
import accounting
led = accounting.PrivacyLedger()
led.compose(accounting.PoissonSampling(0.01).step_event(1.0), 100)
print(round(led.epsilon(1e-5), 3))
allowed = {'numpy', 'scipy', 'dp_accounting', 'accounting', 'attr', 'attrs'}
third = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)
print(sorted(third - allowed))
"""


def test_accounting_imports_without_torch_or_jax():
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    eps_line, extra_line = out.stdout.strip().splitlines()[-2:]
    assert float(eps_line) > 0
    # dp_accounting's own dependencies (e.g. mpmath, absl, dm-tree) may load; ours add nothing else.
    extra = json.loads(extra_line.replace("'", "\""))
    assert not any(m in extra for m in ("torch", "jax", "flax", "optax", "opacus", "pandas", "yaml", "pydantic"))
