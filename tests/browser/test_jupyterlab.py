"""The notebooks' widgets inside a real JupyterLab server, in headless Chromium: the sketch studio of chapter 07 (run
it, draw, the picture updates) and the epoch-grid slider of chapter 03 (train, move the slider, the picture changes).
Notebooks are copied to a temporary folder first: the committed ones are never touched (JupyterLab autosaves)."""
import os, shutil, subprocess, sys, time, urllib.request, secrets
from pathlib import Path
import pytest
from conftest import ROOT, free_port, shot, wait_for

pytest.importorskip('jupyterlab', reason='JupyterLab not installed: pip install -e ".[browser]" (make test-browser does)')
pytest.importorskip('anywidget', reason='the [studio] extra is not installed')
from selenium.webdriver.common.by import By
from selenium.webdriver.common.action_chains import ActionChains

@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "A JupyterLab server on a copy of the notebooks (the demo model linked in when there is one): (url, token, root)"
    root = tmp_path_factory.mktemp('lab')
    (root/'nbs').mkdir()
    for nb in ('03_training.ipynb', '07_studio.ipynb'): shutil.copy(ROOT/'nbs'/nb, root/'nbs'/nb)
    if (ROOT/'runs'/'demo'/'generator.safetensors').is_file(): (root/'runs').mkdir(); (root/'runs'/'demo').symlink_to(ROOT/'runs'/'demo')
    news = root/'.settings'/'@jupyterlab'/'apputils-extension'   # no "get Jupyter news?" toast over the screenshots
    news.mkdir(parents=True); (news/'notification.jupyterlab-settings').write_text('{"fetchNews": "false"}')
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(root/'.cfg'), 'JUPYTERLAB_SETTINGS_DIR': str(root/'.settings'),
           'JUPYTERLAB_WORKSPACES_DIR': str(root/'.ws'), 'JUPYTER_RUNTIME_DIR': str(root/'.rt'), 'IN_TEST': '1',   # as under nbdev_test: the notebooks' closing nbdev_export() is a no-op
           'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2')}
    log = open(root/'lab.log', 'w')
    p = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', f'--port={port}', '--ip=127.0.0.1',
                          f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}', '--allow-root',
                          '--LabApp.expose_app_in_browser=True', '--ServerApp.open_browser=False'],
                         stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f'http://127.0.0.1:{port}'
    def up():
        if p.poll() is not None: raise AssertionError('jupyter lab exited:\n' + (root/'lab.log').read_text()[-2000:])
        try: return urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=2).status == 200
        except OSError: return False
    try:
        wait_for(up, 120, 0.5, 'the JupyterLab server')
        yield url, token, root
    finally:
        p.terminate()
        try: p.wait(20)
        except subprocess.TimeoutExpired: p.kill()
        log.close()

OPEN = """const done = arguments[arguments.length - 1];
const app = window.jupyterapp;
app.commands.execute('docmanager:open', {path: arguments[0]}).then(w => w.context.ready).then(() => done(true), e => done(String(e)));"""
KERNEL = """const w = window.jupyterapp.shell.currentWidget;
const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
return k ? k.status : null;"""
RUN = """const done = arguments[arguments.length - 1];
const [src, upto] = [arguments[0], arguments[1]];
const app = window.jupyterapp, panel = app.shell.currentWidget, nb = panel.content;
let i = -1;
if (src) i = nb.widgets.findIndex(c => c.model.type === 'code' && src.every(s => c.model.sharedModel.getSource().includes(s))
                                     && !c.model.sharedModel.getSource().startsWith('#| export'));
if (src && i < 0) { done('no cell with ' + src.join(' + ')); } else {
  const cmd = src ? (nb.activeCellIndex = i, 'notebook:run-all-above') : 'notebook:run-all-cells';
  app.commands.execute(cmd).then(() => src ? app.commands.execute('notebook:run-cell') : true).then(() => done(i), e => done(String(e)));
}"""
ERRORS = """const nb = window.jupyterapp.shell.currentWidget.content, errs = [];
nb.widgets.forEach((c, i) => {
  if (c.model.type !== 'code') return;
  const o = c.model.outputs;
  for (let k = 0; k < o.length; k++) { const j = o.get(k).toJSON(); if (j.output_type === 'error') errs.push(`cell ${i}: ${j.ename}: ${j.evalue}`); }
});
return errs;"""

def open_and_run(drv, lab, path, cell=None, timeout=600):
    "Open notebook `path` in JupyterLab, run it all (or up to and including the cell containing all of `cell`); return the cell index"
    url, token, root = lab
    drv.get(f'{url}/lab?token={token}&reset')
    wait_for(lambda: drv.execute_script('return !!(window.jupyterapp && window.jupyterapp.shell)'), 120, 0.5, 'JupyterLab to start')
    time.sleep(1)
    assert drv.execute_async_script(OPEN, path) is True
    wait_for(lambda: drv.execute_script(KERNEL) == 'idle', 120, 0.5, f'the kernel of {path}')
    drv.set_script_timeout(timeout)
    i = drv.execute_async_script(RUN, cell)
    assert isinstance(i, int), i
    wait_for(lambda: drv.execute_script(KERNEL) == 'idle', timeout, 0.5, f'{path} to finish running')
    errs = drv.execute_script(ERRORS)
    assert not errs, f'{path} raised in JupyterLab:\n' + '\n---\n'.join(errs)
    return i

def test_studio_widget_in_jupyterlab(browser, lab):
    drv = browser
    open_and_run(drv, lab, 'nbs/07_studio.ipynb')
    studio = wait_for(lambda: drv.find_elements(By.CSS_SELECTOR, '.p2p-studio'), 60, 0.5, 'the Studio widget to render')[0]
    drv.execute_script('arguments[0].scrollIntoView({block: "center"})', studio)
    cv = studio.find_element(By.CSS_SELECTOR, '.p2p-canvas')
    out = studio.find_element(By.CSS_SELECTOR, '.p2p-output')
    def n(): return int(studio.get_attribute('data-updates') or 0)
    # a test sketch, then strokes: each answered by a new picture
    studio.find_element(By.CSS_SELECTOR, '[data-action="example"]').click()
    wait_for(lambda: n() >= 1, 60, 0.1, 'the picture of a test sketch in the widget')
    src = out.get_attribute('src')
    assert src.startswith('data:image/png;base64,')
    w, h = cv.size['width'], cv.size['height']
    for k, (tool, pts) in enumerate([('rect', [(.25, .3), (.4, .45)]), ('rect', [(.55, .3), (.7, .45)]),
                                     ('brick', [(.15, .6), (.85, .6)]), ('pen', [(.2, .85), (.8, .85)])]):
        studio.find_element(By.CSS_SELECTOR, f'[data-tool="{tool}"]').click()
        before = n()
        a = ActionChains(drv, duration=10).move_to_element_with_offset(cv, int((pts[0][0] - .5) * w), int((pts[0][1] - .5) * h)).click_and_hold()
        for x, y in pts[1:]: a = a.move_to_element_with_offset(cv, int((x - .5) * w), int((y - .5) * h))
        a.release().perform()
        wait_for(lambda: n() > before, 60, 0.1, f'the picture after a {tool} stroke in JupyterLab')
    assert out.get_attribute('src') != src, 'the picture did not change after drawing'
    lat = studio.get_attribute('data-latency')
    print(f'JupyterLab widget: stroke-to-picture {float(lat):.0f} ms; status: {studio.find_element(By.CSS_SELECTOR, ".p2p-status").text}')
    shot(drv, 'studio_jupyterlab', studio)

def test_epoch_grid_slider_in_jupyterlab(browser, lab):
    drv = browser
    i = open_and_run(drv, lab, 'nbs/03_training.ipynb', cell=['EpochGrid(', '.fit('])
    cell = drv.execute_script('return window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node', i)
    slider = wait_for(lambda: cell.find_elements(By.CSS_SELECTOR, '.widget-slider'), 60, 0.5, 'the epoch-grid slider')[0]
    img = cell.find_element(By.CSS_SELECTOR, '.widget-image')
    drv.execute_script('arguments[0].scrollIntoView({block: "start"})', slider)
    last = img.get_attribute('src')
    readout = slider.find_element(By.CSS_SELECTOR, '.widget-readout').text
    assert last and readout.isdigit() and int(readout) > 0, readout
    handle = slider.find_element(By.CSS_SELECTOR, '.noUi-handle')
    track = slider.find_element(By.CSS_SELECTOR, '.noUi-target')
    ActionChains(drv, duration=50).click_and_hold(handle).move_by_offset(-track.size['width'] - 20, 0).release().perform()
    wait_for(lambda: slider.find_element(By.CSS_SELECTOR, '.widget-readout').text == '0', 30, 0.2, 'the slider to reach epoch 0')
    wait_for(lambda: img.get_attribute('src') != last, 30, 0.2, 'the epoch grid picture to change')
    shot(drv, 'training_epoch_grid_epoch0', cell)
    ActionChains(drv, duration=50).click_and_hold(handle).move_by_offset(track.size['width'] // 2, 0).release().perform()
    mid = wait_for(lambda: slider.find_element(By.CSS_SELECTOR, '.widget-readout').text not in ('0', ''), 30, 0.2, 'the slider to move right')
    print(f'epoch-grid slider: epoch {readout} -> 0 -> {mid}, picture changed each time')
