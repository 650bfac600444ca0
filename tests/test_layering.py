"""Imports go one way: scripts -> tinyfusion/ -> models/, diffusion/, transport/ -> core/."""
import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_PACKAGES = {"core", "models", "diffusion", "transport", "tinyfusion", "studies", "benchmarks"}
# What each lower package may import of ours (itself included).
ALLOWED = {"core": {"core"}, "diffusion": {"core", "diffusion"}, "transport": {"core", "transport"},
           "models": {"core", "models", "diffusion"}}


def imported_packages(path):
    """Top-level names of our packages that a source file imports (relative imports stay inside the package)."""
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & OUR_PACKAGES


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_packages_import_only_below(package):
    files = glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)
    assert files
    wrong = {os.path.relpath(f, ROOT): sorted(imported_packages(f) - ALLOWED[package]) for f in files}
    assert not {f: w for f, w in wrong.items() if w}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_package_imports_first_in_a_fresh_interpreter(package):
    """Importing a lower package (all its modules) first (as a user of models/ alone does) works and never loads tinyfusion:
    an import cycle through tinyfusion would fail here or show up in sys.modules."""
    code = (f"import importlib, pkgutil, sys, {package}\n"
            f"for m in pkgutil.iter_modules({package}.__path__): importlib.import_module('{package}.' + m.name)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(OUR_PACKAGES)})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(eval(out.stdout.strip().splitlines()[-1]))
    assert package in loaded and loaded <= ALLOWED[package], loaded
