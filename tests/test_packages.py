"""Our top-level packages share names with unrelated PyPI packages: make sure the ones
imported are this repository's, and that the service stays free of heavy imports."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["service", "workers", "search_spaces", "evaluators"])
def test_package_resolves_to_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_service_import_is_light():
    code = (
        "import sys, service, service.cli, search_spaces.recipe, search_spaces.mergekit_format;"
        "heavy = [m for m in ('torch', 'ray', 'lm_eval', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
