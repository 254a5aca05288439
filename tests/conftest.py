"""Shared pytest setup: `--runslow` enables tests marked `slow`; `facades` gives the real data ($PIX2PIX_DATA/facades) or skips."""
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False, help='run tests marked slow')

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: heavy test, run with --runslow (make test-slow)')

def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow'): return
    skip = pytest.mark.skip(reason='slow: run with --runslow (make test-slow)')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)

@pytest.fixture
def facades():
    "Path to the real CMP facades (pix2pix AB layout), or skip when this checkout has none."
    from pix2pix_nb.data import find_facades
    p = find_facades()
    if p is None: pytest.skip('real facades not found (set PIX2PIX_DATA to a folder holding facades/, as `make test` does)')
    return p
