"""Real-browser tests (`make test-browser`): headless Chromium from Debian's `chromium` + `chromium-driver`, driven by
Selenium. Not collected by plain `pytest tests` (`make test`): `make test-browser` sets PIX2PIX_BROWSER_TESTS=1.
They skip, saying why, only when no browser can be started (chromium/chromedriver missing, selenium not installed)."""
import os, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get('PIX2PIX_SHOTS', Path(__file__).parent/'_shots'))

if not os.environ.get('PIX2PIX_BROWSER_TESTS'):
    collect_ignore_glob = ['test_*.py']   # `make test-browser` runs them

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def find_browser():
    "(chromium, chromedriver) paths, or a reason why there are none"
    b = next((shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(n)), None)
    d = shutil.which('chromedriver') or ('/usr/bin/chromedriver' if Path('/usr/bin/chromedriver').exists() else None)
    if not b or not d:
        return None, ('no headless browser: ' + ', '.join(n for n, p in (('chromium', b), ('chromedriver', d)) if not p)
                      + ' not found (`make test-browser` installs Debian\'s chromium and chromium-driver with apt; it could not here)')
    return (b, d), ''

@pytest.fixture(scope='session')
def browser():
    "A headless Chromium session (1400x1000, fresh profile), or skip with the reason"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e: pytest.skip(f'selenium not installed ({e}): pip install -e ".[browser]" (make test-browser does)')
    paths, why = find_browser()
    if not paths: pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    profile = tempfile.mkdtemp(prefix='p2p-chromium-')
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--window-size=1400,1000',
              '--force-device-scale-factor=1', '--hide-scrollbars', '--disable-background-networking', '--no-first-run',
              f'--user-data-dir={profile}'):
        opts.add_argument(a)
    try: drv = webdriver.Chrome(service=Service(executable_path=paths[1]), options=opts)
    except Exception as e: pytest.skip(f'chromium did not start: {" ".join(str(e).split())[:300]}')
    drv.set_script_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield drv
    drv.quit(); shutil.rmtree(profile, ignore_errors=True)

def shot(drv, name, el=None) -> Path:
    "Screenshot of the page (or of element `el`) as SHOTS/name.png"
    p = SHOTS/f'{name}.png'
    (el.screenshot if el is not None else drv.save_screenshot)(str(p))
    print(f'screenshot: {p}')
    return p

@pytest.fixture(scope='session')
def model_path(tmp_path_factory):
    "The demo model when runs/demo has one (realistic pictures and latency), else a tiny one trained now (seconds)"
    demo = ROOT/'runs'/'demo'/'generator.safetensors'
    if demo.is_file(): return demo
    from pix2pix_nb.data import synthetic_facades
    from pix2pix_nb.train import fit
    tmp = tmp_path_factory.mktemp('model')
    small = synthetic_facades(tmp/'syn', n_train=16, n_val=4, n_test=8, size=32)
    fit(small, epochs=2, size=32, bs=4, ngf=16, ndf=16, out=tmp/'run', progress=False, n_grid=2)
    return tmp/'run'/'generator.safetensors'

def wait_for(cond, timeout=60, every=0.2, what='condition'):
    "Poll `cond()` until it returns something truthy; fail naming `what` after `timeout` seconds"
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v: return v
        time.sleep(every)
    raise AssertionError(f'timed out after {timeout}s waiting for {what}')
