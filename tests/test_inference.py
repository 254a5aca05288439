"""pix2pix_nb.inference: export/load round trip, bad model files, colorize inputs, evaluate, and the CLI in a subprocess."""
import sys, json, subprocess
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image, ImageDraw
from pix2pix_nb.generator import UnetGenerator
from pix2pix_nb.inference import (export_generator, load_generator, colorize, evaluate, expand_inputs, ModelFileError,
                                  prepare)
from pix2pix_nb.cli import pix2pix_colorize

BIN = Path(sys.executable).parent

def cli(*args, timeout=120):
    r = subprocess.run([str(BIN/'pix2pix_colorize'), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    # drop third-party import-time warnings (torch.jit deprecation) so we count only our own lines
    lines = r.stderr.splitlines(); keep, skip = [], False
    for l in lines:
        if 'Warning:' in l: skip = True; continue
        if skip and l.startswith('  '): continue
        skip = False; keep.append(l)
    r.stderr = '\n'.join(keep)
    return r

@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    g = UnetGenerator(ngf=4, size=32)
    with torch.no_grad():   # non-trivial BN statistics, so a wrong load would show
        for m in g.modules():
            if isinstance(m, torch.nn.BatchNorm2d): m.running_mean.uniform_(-.1, .1); m.running_var.uniform_(.5, 2)
    return export_generator(g, tmp_path_factory.mktemp('m')/'g.safetensors', direction='AtoB', epochs=3), g

def sketch(w=300, h=500, mode='L'):
    im = Image.new('L', (w, h), 255); ImageDraw.Draw(im).rectangle([w//10, h//10, w - w//10, h - h//10], outline=0, width=2)
    return im.convert(mode)

def test_round_trip_identical(model_file):
    fn, g = model_file
    g2 = load_generator(fn)
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad(): assert torch.equal(g.eval()(x), g2(x))
    meta = json.loads(fn.with_suffix('.json').read_text())
    assert meta['arch'] == 'pix2pix_nb.generator:UnetGenerator' and meta['hparams'] == g.hparams
    assert meta['normalization'] == [-1, 1] and meta['epochs'] == 3 and meta['size'] == 32 and 'version' in meta
    assert load_generator(fn.with_suffix('.json')).meta == meta   # the sidecar path works too
    assert b'pickle' not in fn.read_bytes()[:200]

def test_export_from_learner_like(tmp_path):
    class M(torch.nn.Module):
        def __init__(s): super().__init__(); s.G, s.D = UnetGenerator(ngf=4, size=32), torch.nn.Conv2d(6, 1, 3)
    class Learn: model = M()
    fn = export_generator(Learn(), tmp_path/'x.safetensors')
    assert load_generator(fn).hparams == Learn.model.G.hparams
    with pytest.raises(ValueError, match='safetensors'): export_generator(Learn(), tmp_path/'x.pt')
    with pytest.raises(ValueError, match='hparams'): export_generator(torch.nn.Conv2d(1, 1, 1), tmp_path/'y.safetensors')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['x.json', 'x.safetensors']   # no temporary files left behind

def _copy(fn, dest, meta=None, data=None):
    dest.write_bytes(fn.read_bytes() if data is None else data)
    if meta is not False: dest.with_suffix('.json').write_text(fn.with_suffix('.json').read_text() if meta is None else json.dumps(meta))
    return dest

def test_bad_model_files(model_file, tmp_path):
    fn, _ = model_file
    meta = json.loads(fn.with_suffix('.json').read_text())
    with pytest.raises(FileNotFoundError, match='nope'): load_generator(tmp_path/'nope.safetensors')
    with pytest.raises(ModelFileError, match='sidecar'): load_generator(_copy(fn, tmp_path/'a.safetensors', meta=False))
    with pytest.raises(ModelFileError, match='truncated'): load_generator(_copy(fn, tmp_path/'b.safetensors', data=fn.read_bytes()[:-500]))
    with pytest.raises(ModelFileError, match='truncated'): load_generator(_copy(fn, tmp_path/'c.safetensors', data=b'garbage' * 10))
    for arch in ['os:system', 'builtins:eval', 'pix2pix_nbevil.x:Y', 'pix2pix_nb.generator']:
        with pytest.raises(ModelFileError, match='refused'): load_generator(_copy(fn, tmp_path/'d.safetensors', {**meta, 'arch': arch}))
    with pytest.raises(ModelFileError, match='not a network'):
        load_generator(_copy(fn, tmp_path/'e.safetensors', {**meta, 'arch': 'pix2pix_nb.generator:get_norm'}))
    with pytest.raises(ModelFileError, match='mismatch'):
        load_generator(_copy(fn, tmp_path/'f.safetensors', {**meta, 'hparams': {**meta['hparams'], 'ngf': 8}}))
    with pytest.raises(ModelFileError, match='mismatch'):
        load_generator(_copy(fn, tmp_path/'g.safetensors', {**meta, 'hparams': {**meta['hparams'], 'n_downs': 4}}))
    with pytest.raises(ModelFileError, match='not a pix2pix_nb generator sidecar'):
        load_generator(_copy(fn, tmp_path/'h.safetensors', {'hello': 1}))
    (tmp_path/'i.json').write_text('{not json'); (tmp_path/'i.safetensors').write_bytes(fn.read_bytes())
    with pytest.raises(ModelFileError, match='JSON'): load_generator(tmp_path/'i.safetensors')
    from safetensors.torch import save_file   # a valid safetensors that is not ours
    save_file({'w': torch.zeros(2)}, str(tmp_path/'j.safetensors')); _copy(fn, tmp_path/'k.safetensors')
    (tmp_path/'j.json').write_text(fn.with_suffix('.json').read_text())
    with pytest.raises(ModelFileError, match='not a pix2pix_nb generator file'): load_generator(tmp_path/'j.safetensors')

def test_errors_are_one_line(model_file, tmp_path):
    fn, _ = model_file
    with pytest.raises(ModelFileError) as e: load_generator(_copy(fn, tmp_path/'b.safetensors', data=fn.read_bytes()[:100]))
    assert '\n' not in str(e.value) and 'b.safetensors' in str(e.value)

@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'P', 'RGB', 'RGBA', 'I;16', 'CMYK'])
def test_colorize_modes_and_sizes(model_file, mode):
    g = load_generator(model_file[0])
    out = colorize(g, sketch(300, 500, mode) if mode != 'I;16' else Image.fromarray(np.asarray(sketch()).astype(np.uint16) * 257))
    assert out.size == (300, 500) and out.mode == 'RGB'

def test_colorize_inputs(model_file, tmp_path):
    g = load_generator(model_file[0])
    sk = sketch(); sk.save(tmp_path/'s.png')
    ins = [tmp_path/'s.png', str(tmp_path/'s.png'), sk, np.asarray(sk), np.asarray(sk) > 128, np.asarray(sk.convert('RGB')) / 255.,
           torch.from_numpy(np.array(sk.convert('RGB'))).permute(2, 0, 1), sketch(7, 3), sketch(1000, 40)]
    outs = colorize(g, ins, bs=3)
    assert [o.size for o in outs] == [(300, 500)] * 7 + [(7, 3), (1000, 40)]
    ref = np.asarray(outs[0])
    for o in outs[1:4]: assert np.array_equal(np.asarray(o), ref)   # same picture whatever the container, batched or not
    assert np.array_equal(np.asarray(colorize(g, sk)), ref)          # dropout off: repeatable
    with pytest.raises(ValueError, match='outside'): colorize(g, np.full((5, 5), 2.))
    with pytest.raises(ValueError, match='shape'): colorize(g, np.zeros((5, 5, 2)))
    with pytest.raises(TypeError, match='int'): colorize(g, 3)
    (tmp_path/'bad.png').write_bytes(b'not an image')
    with pytest.raises(ValueError, match='bad.png'): colorize(g, tmp_path/'bad.png')

def test_dropout_changes_output():
    torch.manual_seed(0)
    g = UnetGenerator(ngf=4, size=32, dropout=True).eval()
    a, b = (np.asarray(colorize(g, sketch(64, 64), dropout=True)) for _ in range(2))
    assert not np.array_equal(a, b)
    a, b = (np.asarray(colorize(g, sketch(64, 64))) for _ in range(2))
    assert np.array_equal(a, b)

def test_prepare_pads_to_multiple():
    x, (w, h) = prepare(sketch(300, 500).convert('RGB'), 256, 256)
    assert x.shape == (1, 3, 512, 256) and (w, h) == (256, 427)
    x, (w, h) = prepare(sketch(1000, 40).convert('RGB'), 32, 32)   # long thin image: padding in several reflect steps
    assert x.shape[-2:] == (32, 800) and (w, h) == (800, 32)

def test_evaluate_report(model_file, tmp_path):
    from pix2pix_nb.data import synthetic_facades
    src = synthetic_facades(tmp_path/'syn', n_train=2, n_val=2, n_test=5, size=32)
    res = evaluate(load_generator(model_file[0]), src, bs=2, report=tmp_path/'rep', n_report=3)
    assert res['n'] == 5 and 0 < res['l1'] < 2 and res['fid'] is None
    sheet = Image.open(tmp_path/'rep'/'sheet_000.png'); assert sheet.size == (2 + 3 * 34, 2 + 3 * 34)   # tile: 3 columns x 3 rows of 32 px, 2 px gaps
    assert 'sheet_000.png' in (tmp_path/'rep'/'index.html').read_text()
    assert evaluate(load_generator(model_file[0]), src, n=3, fid=False)['n'] == 3

def test_expand_inputs(tmp_path):
    (tmp_path/'d').mkdir(); sketch().save(tmp_path/'d'/'a.png'); sketch().save(tmp_path/'d'/'b.jpg'); (tmp_path/'d'/'c.txt').write_text('x')
    files, errs = expand_inputs([tmp_path/'d', str(tmp_path/'d'/'*.png'), tmp_path/'missing.png', str(tmp_path/'none*.png')])
    assert [f.name for f in files] == ['a.png', 'b.jpg'] and len(errs) == 2 and 'missing.png' in errs[0]

def test_cli_partial_success(model_file, tmp_path):
    fn, _ = model_file
    src = tmp_path/'in'; src.mkdir()
    sketch(300, 500).save(src/'tall.png'); sketch(123, 77, '1').save(src/'odd.bmp'); (src/'broken.png').write_bytes(b'\x89PNG junk')
    other = tmp_path/'other'; other.mkdir(); sketch(50, 50).save(other/'tall.jpg')   # same stem as in/tall.png
    r = cli(fn, src, str(other/'*.jpg'), '-o', tmp_path/'out', '--quiet')
    assert r.returncode == 1, r.stderr
    assert 'broken.png' in r.stderr and len([l for l in r.stderr.splitlines() if 'broken' in l]) == 1
    out = tmp_path/'out'
    assert sorted(p.name for p in out.iterdir()) == ['odd.png', 'tall-2.png', 'tall.png']
    assert Image.open(out/'tall.png').size == (300, 500) and Image.open(out/'tall-2.png').size == (50, 50)
    # a second run keeps what is there (exit 0 without the broken file) and --overwrite replaces
    before = (out/'tall.png').stat().st_mtime_ns
    r = cli(fn, src/'tall.png', '-o', out, '--quiet'); assert r.returncode == 0 and 'kept' in r.stderr
    assert (out/'tall.png').stat().st_mtime_ns == before
    r = cli(fn, src/'tall.png', '-o', out, '--quiet', '--overwrite'); assert r.returncode == 0
    assert (out/'tall.png').stat().st_mtime_ns != before
    assert not [p for p in out.iterdir() if p.name.startswith('.')]   # no temporary files left

def test_cli_bad_model_and_missing_inputs(model_file, tmp_path):
    fn, _ = model_file
    (tmp_path/'m.safetensors').write_bytes(b'junk')
    r = cli(tmp_path/'m.safetensors', tmp_path, '-o', tmp_path/'o')
    assert r.returncode == 2 and 'sidecar' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli(fn, tmp_path/'nothing.png', '-o', tmp_path/'o', '--quiet')
    assert r.returncode == 1 and 'nothing.png: not found' in r.stderr

def test_written_files_get_plain_permissions(model_file, tmp_path):
    "Atomic writes go through mkstemp (0600); what lands must have the mode a plain open() gives (0666 - umask)."
    import os
    from pix2pix_nb.inference import colorize_files
    fn, g = model_file
    old = os.umask(0o022)
    try:
        out = export_generator(g, tmp_path/'e.safetensors')
        sketch().save(tmp_path/'s.png')
        written, _, failed = colorize_files(load_generator(out), [tmp_path/'s.png'], tmp_path/'col', progress=False)
    finally: os.umask(old)
    assert not failed and len(written) == 1
    for f in [out, out.with_suffix('.json'), *map(Path, written)]: assert f.stat().st_mode & 0o777 == 0o644, f

def test_colorize_rotated_phone_jpeg(model_file, tmp_path):
    "A JPEG stored sideways with EXIF Orientation 6 is colourised upright, at its displayed size, from a path or a PIL image."
    g = load_generator(model_file[0])
    ex = Image.Exif(); ex[0x0112] = 6
    sketch(300, 500).transpose(Image.ROTATE_90).save(tmp_path/'phone.jpg', exif=ex)     # stored 500x300
    assert Image.open(tmp_path/'phone.jpg').size == (500, 300)
    up = colorize(g, tmp_path/'phone.jpg')
    assert up.size == (300, 500) and colorize(g, Image.open(tmp_path/'phone.jpg')).size == (300, 500)
    ref = colorize(g, sketch(300, 500))                                                  # the same drawing, stored upright
    assert np.abs(np.asarray(up, float) - np.asarray(ref, float)).mean() < 8             # (JPEG noise aside)
