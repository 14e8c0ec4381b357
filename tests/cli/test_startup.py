"""`dptrain --help` / `--version` start fast: parsing arguments imports no accountant, array or ML framework."""

import subprocess
import sys

HEAVY = ("dp_accounting", "scipy", "torch", "jax", "pandas", "sklearn", "transformers")


def test_the_cli_module_imports_nothing_heavy():
    code = ("import sys, dptrain.cli, accounting\n"
            "from dptrain.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_accounting_names_load_on_first_use():
    code = ("import sys, accounting as acc\n"
            "assert 'dp_accounting' not in sys.modules\n"
            "from accounting import PoissonSampling, PrivacyError\n"
            "assert acc.calibrate_noise_multiplier.__module__ == 'accounting.calibrate'\n"
            "assert 'dp_accounting' in sys.modules and acc.errors.PrivacyError is PrivacyError\n"
            "assert set(acc.__all__) <= set(dir(acc))\n"
            "try:\n    acc.nope\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "has no attribute 'nope'" in out
