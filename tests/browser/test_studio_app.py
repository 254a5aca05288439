"""The web studio (`pix2pix_studio MODEL`) in headless Chromium: draw with every tool, upload a sketch and a bad file,
the JavaScript hatch rule against `hatch_mask`, and the stroke-to-picture latency."""
import base64, io, os, subprocess, sys, time, urllib.request
from pathlib import Path
import numpy as np, pytest
from PIL import Image, ImageDraw
from conftest import ROOT, SHOTS, free_port, shot, wait_for

pytest.importorskip('starlette', reason='the [studio] extra is not installed: pip install -e ".[studio]"')
from selenium.webdriver.common.by import By
from selenium.webdriver.common.action_chains import ActionChains

@pytest.fixture(scope='module')
def app(model_path):
    "`pix2pix_studio MODEL` as a user starts it, on a free port; its URL"
    port = free_port()
    exe = Path(sys.executable).parent/'pix2pix_studio'
    p = subprocess.Popen([str(exe), str(model_path), '--port', str(port), '--examples', '6'],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f'http://127.0.0.1:{port}/'
    def up():
        if p.poll() is not None: raise AssertionError(f'pix2pix_studio exited: {p.stdout.read()}')
        try: return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError: return False
    try:
        wait_for(up, 120, 0.5, 'pix2pix_studio to serve its page')
        yield url
    finally:
        p.terminate()
        try: p.wait(10)
        except subprocess.TimeoutExpired: p.kill()

def out_src(drv): return drv.execute_script("return document.querySelector('.p2p-output').getAttribute('src') || ''")
def updates(drv): return int(drv.execute_script("return +(document.querySelector('.p2p-studio').dataset.updates || 0)"))

def picture(drv) -> np.ndarray:
    src = out_src(drv)
    assert src.startswith('data:image/png;base64,'), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(',', 1)[1]))).convert('RGB'), np.float32)

def canvas_px(drv) -> np.ndarray:
    return np.array(drv.execute_script('return Array.from(window.studio.pixels)'), np.uint8)

def stroke(drv, tool, pts, wait=True):
    "Pick `tool`, drag through `pts` (fractions of the canvas), wait for the picture that answers it"
    drv.find_element(By.CSS_SELECTOR, f'[data-tool="{tool}"]').click()
    cv = drv.find_element(By.CSS_SELECTOR, '.p2p-canvas')
    w, h = cv.size['width'], cv.size['height']
    n0 = updates(drv)
    a = ActionChains(drv, duration=10).move_to_element_with_offset(cv, int((pts[0][0] - .5) * w), int((pts[0][1] - .5) * h)).click_and_hold()
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        for t in np.linspace(0, 1, 6)[1:]:
            a = a.move_to_element_with_offset(cv, int((x0 + t * (x1 - x0) - .5) * w), int((y0 + t * (y1 - y0) - .5) * h))
    a.release().perform()
    if wait: wait_for(lambda: updates(drv) > n0, 60, 0.05, f'the picture after a {tool} stroke')

def test_draw_upload_and_errors(browser, app, tmp_path):
    drv = browser
    drv.get(app)
    wait_for(lambda: drv.execute_script('return !!window.studio'), 30, 0.1, 'the studio module to load')
    assert drv.find_element(By.CSS_SELECTOR, '.p2p-output').get_attribute('src') in (None, '')
    size = drv.execute_script('return document.querySelector(".p2p-canvas").width')
    blank = canvas_px(drv); assert (blank == 255).all()

    # draw: a wall, windows, a floor line, brick hatching, a pen squiggle, an erased corner
    stroke(drv, 'rect', [(.1, .15), (.9, .92)])
    first = picture(drv)
    assert first.shape == (size, size, 3) and first.std() > 1, 'the picture is blank'
    assert (canvas_px(drv) == 0).sum() > 2 * size, 'the rectangle was not drawn on the canvas'
    for r in range(3):
        for c in range(3): stroke(drv, 'rect', [(.2 + c * .22, .25 + r * .2), (.32 + c * .22, .38 + r * .2)])
    stroke(drv, 'line', [(.1, .8), (.9, .8)])
    stroke(drv, 'brick', [(.15, .84), (.85, .84), (.85, .9)])
    stroke(drv, 'pen', [(.5, .05), (.55, .1), (.6, .06)])
    px = canvas_px(drv)
    stroke(drv, 'eraser', [(.6, .06), (.5, .05)])
    assert (canvas_px(drv) == 255).sum() > (px == 255).sum(), 'the eraser erased nothing'
    assert set(np.unique(canvas_px(drv))) <= {0, 255}, 'the canvas is not binary'
    drawn = picture(drv)
    assert np.abs(drawn - first).mean() > 1, 'the picture did not change with the drawing'
    lat = float(drv.execute_script("return document.querySelector('.p2p-studio').dataset.latency"))
    shot(drv, 'studio_app_drawing')

    # undo brings the previous canvas back
    before = canvas_px(drv)
    drv.find_element(By.CSS_SELECTOR, '[data-action="undo"]').click()
    assert (canvas_px(drv) != before).any(), 'undo changed nothing'

    # the JavaScript hatch rule is hatch_mask's
    from pix2pix_nb.studio import hatch_params, hatch_mask
    for kind, p in hatch_params(size).items():
        js = np.array(drv.execute_script('const [p, S] = arguments; const o = [];'
                                         'for (let y = 0; y < S; y++) for (let x = 0; x < S; x++) o.push(window.studio.hatchAt(p, x, y) ? 1 : 0);'
                                         'return o;', p, size), bool).reshape(size, size)
        assert (js == hatch_mask(kind, size)).all(), f'JavaScript {kind} hatch differs from hatch_mask'

    # an example from the test split
    n0 = updates(drv)
    drv.find_element(By.CSS_SELECTOR, '[data-example="1"]').click()
    wait_for(lambda: updates(drv) > n0, 60, 0.05, 'the picture of a test sketch')
    assert (canvas_px(drv) == 0).sum() > size, 'the example sketch is not on the canvas'

    # upload a photo of a pencil sketch: it lands on the canvas, binarised, and gets its picture
    photo = Image.new('L', (300, 420), 200); d = ImageDraw.Draw(photo)
    d.rectangle([30, 40, 270, 400], outline=70, width=4)
    for r in range(4):
        for c in range(3): d.rectangle([60 + c * 70, 80 + r * 75, 100 + c * 70, 130 + r * 75], outline=80, width=3)
    photo.convert('RGB').save(tmp_path/'my sketch.jpg', quality=80)
    n0 = updates(drv)
    drv.find_element(By.ID, 'upload').send_keys(str(tmp_path/'my sketch.jpg'))
    wait_for(lambda: updates(drv) > n0, 60, 0.05, 'the picture of the uploaded sketch')
    assert drv.find_element(By.CSS_SELECTOR, '.p2p-error').text == ''
    assert set(np.unique(canvas_px(drv))) == {0, 255}
    assert picture(drv).std() > 1
    link = drv.find_element(By.ID, 'download')
    assert link.is_displayed() and link.get_attribute('href') == out_src(drv) and link.get_attribute('download') == 'facade.png'
    shot(drv, 'studio_app_upload')

    # a bad upload: a red line on the page naming the file, no traceback, the picture kept
    keep = out_src(drv)
    (tmp_path/'notes.txt').write_text('not a picture')
    drv.find_element(By.ID, 'upload').send_keys(str(tmp_path/'notes.txt'))
    msg = wait_for(lambda: drv.find_element(By.CSS_SELECTOR, '.p2p-error').text, 30, 0.1, 'the error message of a bad upload')
    assert 'notes.txt' in msg and 'Traceback' not in drv.page_source, msg
    assert drv.find_element(By.CSS_SELECTOR, '.p2p-error').is_displayed() and out_src(drv) == keep
    shot(drv, 'studio_app_bad_upload')

    # latency: ten pen strokes, stroke lifted -> picture shown
    lats = []
    for i in range(10):
        stroke(drv, 'pen', [(.2 + .06 * i, .3), (.22 + .06 * i, .6)])
        lats.append(float(drv.execute_script("return document.querySelector('.p2p-studio').dataset.latency")))
    net = float(drv.execute_script("return document.querySelector('.p2p-studio').dataset.networkMs"))
    print(f'stroke-to-picture latency at {size} px: median {np.median(lats):.0f} ms, max {max(lats):.0f} ms '
          f'(Python part of the last: {net:.0f} ms; {os.cpu_count()} CPUs)')
    assert np.median(lats) < 3000, lats
