"""The sketch studio without a browser: the engine's protocol, the hatch rule, `pix2pix_studio` as a user runs it
(serves 127.0.0.1, answers the page's messages, one-line errors). The browser tests are in tests/browser/."""
import base64, io, json, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image, ImageDraw

pytest.importorskip('anywidget', reason='the [studio] extra is not installed: pip install -e ".[studio]"')
pytest.importorskip('starlette', reason='the [studio] extra is not installed: pip install -e ".[studio]"')
from pix2pix_nb.core import DataError
from pix2pix_nb.generator import UnetGenerator, export_generator
from pix2pix_nb.studio import SketchEngine, Studio, data_url, read_data_url, to_sketch, hatch_mask, hatch_params
from pix2pix_nb.studio_app import studio_app, port_free

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    return export_generator(UnetGenerator(ngf=8, size=32), tmp_path_factory.mktemp('m')/'tiny.safetensors', direction='AtoB')

def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def test_engine_protocol(model_file):
    e = SketchEngine(model_file, examples=3)
    assert e.size == 32 and len(e.examples) == 3
    r = e.handle({'kind': 'example', 'i': 4})                       # wraps around
    assert set(r) == {'sketch', 'image', 'ms'} and read_data_url(r['image']).size == (32, 32)
    sk = read_data_url(r['sketch']).convert('L'); ImageDraw.Draw(sk).line([0, 16, 31, 16], fill=0)
    r2 = e.handle({'kind': 'sketch', 'png': data_url(sk)})
    assert r2['image'] != r['image'] and r2['ms'] > 0
    for msg, part in [({'kind': 'upload', 'name': 'a.txt', 'data': 'data:text/plain;base64,aGk='}, 'a.txt: not an image'),
                      ({'kind': 'upload', 'name': 'b.png', 'data': 'data:image/png;base64,@@'}, 'b.png: broken base64'),
                      ({'kind': 'sketch', 'png': 42}, 'the canvas'), ({'kind': 'nope'}, 'unknown message kind'), ([], 'None')]:
        out = e.handle(msg)
        assert list(out) == ['error'] and part in out['error'] and '\n' not in out['error'], out

def test_sample_needs_dropout(model_file):
    with pytest.raises(ValueError, match='no dropout layers'): SketchEngine(UnetGenerator(ngf=8, size=32, dropout=False), dropout=True, examples=0)
    e = SketchEngine(model_file, dropout=True, examples=1)
    png = data_url(e.examples[0])
    assert e.handle({'kind': 'sample', 'png': png})['image'] != e.handle({'kind': 'sample', 'png': png})['image']

def test_widget_messages(model_file):
    w = Studio(model_file, examples=2)
    sent = []
    w.send = lambda content, buffers=None: sent.append(content)
    w._on_msg(w, {'kind': 'example', 'i': 0, 'id': 'x1'}, [])
    assert sent[-1]['id'] == 'x1' and 'image' in sent[-1] and w.output == sent[-1]['image']
    assert w.size == 32 and w.hatch == hatch_params(32) and [im.size for im in w.images()] == [(32, 32)] * 2

def test_hatch_and_sketch_conversion():
    for kind in ('brick', 'stone', 'siding'):
        m = hatch_mask(kind, 128)
        assert m.dtype == bool and m[0].all() and 0.05 < m.mean() < 0.4
    s = to_sketch(Image.new('RGB', (640, 480), (200, 190, 180)), 64)
    assert s.size == (64, 64) and (np.asarray(s) == 255).all()
    with pytest.raises(DataError, match='bomb|pixels'):
        big = Image.new('1', (12000, 12000)); buf = io.BytesIO(); big.save(buf, 'PNG')
        read_data_url('data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode(), 'big.png')

def _post(url, body, ctype='application/json'):
    rq = urllib.request.Request(url + 'api', body, {'Content-Type': ctype})
    try:
        with urllib.request.urlopen(rq, timeout=60) as f: return f.status, json.loads(f.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read())

def test_console_script_serves_the_page(model_file):
    "`pix2pix_studio MODEL` as a user runs it: on 127.0.0.1 by default, the page, the module, the API, bad requests"
    exe = Path(sys.executable).parent/'pix2pix_studio'
    assert exe.exists(), 'console script missing: pip install -e ".[dev]"'
    port = free_port()
    p = subprocess.Popen([str(exe), str(model_file), '--port', str(port), '--examples', '2'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f'http://127.0.0.1:{port}/'
    try:
        first = p.stdout.readline()
        assert f'http://127.0.0.1:{port}/' in first, first
        for _ in range(200):
            try: page = urllib.request.urlopen(url, timeout=2).read().decode(); break
            except OSError: time.sleep(0.1)
        else: raise AssertionError('no page')
        assert 'createStudio' in page and 'id="upload"' in page and 'download' in page
        assert 'export function createStudio' in urllib.request.urlopen(url + 'studio.js').read().decode()
        st, r = _post(url, json.dumps({'kind': 'example', 'i': 1}).encode())
        assert st == 200 and set(r) == {'sketch', 'image', 'ms'}
        st, r = _post(url, json.dumps({'kind': 'upload', 'name': 'cv.docx', 'data': 'data:application/msword;base64,UEsDBA=='}).encode())
        assert st == 200 and r['error'].startswith('cv.docx')
        st, r = _post(url, b'{oops')
        assert st == 400 and 'not JSON' in r['error']
        assert not port_free('127.0.0.1', port)
    finally:
        p.terminate(); p.wait(20)

def test_console_script_errors(model_file, tmp_path):
    exe = Path(sys.executable).parent/'pix2pix_studio'
    r = subprocess.run([str(exe), str(tmp_path/'nope.safetensors')], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith('pix2pix_studio: error:') and 'nope.safetensors' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0)); busy.listen()
        r = subprocess.run([str(exe), str(model_file), '--port', str(busy.getsockname()[1])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'is in use' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

def test_packaging():
    ini = (ROOT/'settings.ini').read_text()
    assert 'pix2pix_studio=pix2pix_nb.studio_app:pix2pix_studio' in ini and 'studio_requirements' in ini
