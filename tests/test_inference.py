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

# ------------------------------------------------------------------ batching, precision, compile (issue #15: inference)
from pix2pix_nb.inference import colorize_files, inference_engine, check_files_args
from pix2pix_nb.callbacks import resolve_precision

def _bn_model(model_file): return load_generator(model_file[0])   # BatchNorm with non-trivial running statistics

def test_batched_equals_single_and_layouts(model_file):
    "Eval-mode BatchNorm shares nothing across a batch: batched == one at a time within fp32 rounding; channels_last too, and it is undone."
    g = _bn_model(model_file)
    x = torch.rand(5, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with inference_engine(g, precision='fp32') as run:
        assert (run.precision, run.channels_last, run.compiled) == ('fp32', False, False)
        batched, singles = run(x), torch.cat([run(t[None]) for t in x])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    with inference_engine(g, precision='fp32', channels_last=True) as run: cl = run(x)
    torch.testing.assert_close(cl, singles, rtol=1e-5, atol=1e-5)
    assert all(p.is_contiguous() for p in g.parameters()) and not g.training
    with inference_engine(g, precision='bf16') as run: b16 = run(x)
    assert b16.dtype == torch.float32 and 0 < (b16 - singles).abs().max() < 0.1     # close, not equal
    sks = [sketch(300, 500), sketch(300, 500, '1'), sketch(200, 120), sketch(300, 500).rotate(3, fillcolor=255)]
    one = [colorize(g, s, precision='fp32') for s in sks]
    for b in (2, 4):
        for a, o in zip(colorize(g, sks, bs=b, precision='fp32'), one): assert np.abs(np.asarray(a, int) - np.asarray(o, int)).max() <= 1

def test_precision_and_bs_checked(model_file):
    g = _bn_model(model_file)
    with pytest.raises(ValueError, match="precision='fp8'"): colorize(g, sketch(40, 40), precision='fp8')
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match='bs='): colorize(g, [sketch(40, 40)], bs=bad)
    with pytest.raises(ValueError, match='size=0'): check_files_args(g, size=0)
    with inference_engine(g) as run: assert (run.precision, run.channels_last) == resolve_precision('auto', None, 'cpu')   # 'auto': the training rule

def _folder(d, n=9):
    d.mkdir()
    for i in range(n): (sketch(300, 500) if i % 3 == 0 else sketch(123, 77, '1') if i % 3 == 1 else sketch(64, 64)).rotate(i, fillcolor=255).save(d/f'{i}.png')
    return d

def test_colorize_files_batched_matches_single(model_file, tmp_path):
    "Same files, same failures, same log lines and the same pixels (±1 level) in batches of 3 as one at a time; lists in input order."
    g = _bn_model(model_file)
    src = _folder(tmp_path/'in'); (src/'4.png').write_bytes(b'\x89PNG junk')
    files = [src/f'{i}.png' for i in range(9)]
    res, logs = {}, {}
    for b in (3, 1):
        logs[b] = []
        res[b] = colorize_files(g, files, tmp_path/f'o{b}', bs=b, precision='fp32', progress=False, log=logs[b].append)
    w, s, f = res[3]
    assert [p.name for p in w] == [f'{i}.png' for i in range(9) if i != 4] and f == [src/'4.png'] and s == []
    assert [p.name for p in res[1][0]] == [p.name for p in w] and logs[3] == logs[1] and len(logs[3]) == 1 and '4.png' in logs[3][0]
    for p in w:
        a, b = (np.asarray(Image.open(tmp_path/o/p.name), int) for o in ('o3', 'o1'))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, p.name
    assert Image.open(tmp_path/'o3'/'0.png').size == (300, 500) and Image.open(tmp_path/'o3'/'1.png').size == (123, 77)

class _Flaky(torch.nn.Module):
    "Wraps a generator: MemoryError for batches larger than `max_bs`, or whenever an input of the batch is all white (`poison`)."
    def __init__(self, g, max_bs=99, poison=False):
        super().__init__(); self.g, self.max_bs, self.poison, self.hparams, self.calls = g, max_bs, poison, g.hparams, []
    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.max_bs or (self.poison and any(bool((t > 0.99).all()) for t in x)): raise MemoryError('out of memory (test)')
        return self.g(x)

def test_colorize_files_out_of_memory_retries_one_at_a_time(model_file, tmp_path):
    g = _bn_model(model_file)
    src = _folder(tmp_path/'in', 6)
    Image.new('L', (64, 64), 255).save(src/'white.png')   # same shape as 2.png and 5.png: batched with them
    files = sorted(src.iterdir())
    fl = _Flaky(g, max_bs=1)
    w, _, f = colorize_files(fl, files, tmp_path/'a', bs=4, precision='fp32', progress=False, log=lambda s: None)
    assert len(w) == 7 and not f and max(fl.calls) > 1          # the batch failed, every image done alone
    logs = []
    w, _, f = colorize_files(_Flaky(g, poison=True), files, tmp_path/'b', bs=4, precision='fp32', progress=False, log=logs.append)
    assert [p.name for p in f] == ['white.png'] and len(w) == 6 and len(logs) == 1 and 'white.png' in logs[0] and 'out of memory' in logs[0]

def test_compile_falls_back_to_eager(model_file, monkeypatch, capsys):
    "A compiled generator that fails at its first call: one notice, then the eager result (compiling itself is tests/test_compile.py's)."
    import pix2pix_nb.inference as inf
    g = _bn_model(model_file)
    def broken(m, **kw):
        def f(*a): raise RuntimeError('inductor: no C++ compiler\nsecond line')
        return f
    monkeypatch.setattr(inf, 'compile_supported', lambda dev: (True, '')); monkeypatch.setattr(torch, 'compile', broken)
    with inference_engine(g, precision='fp32', compile=True) as run:
        assert run.compiled
        y = run(torch.zeros(1, 3, 32, 32))
    with inference_engine(g, precision='fp32') as run: ref = run(torch.zeros(1, 3, 32, 32))
    assert torch.equal(y, ref)
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'compile: failed (inductor: no C++ compiler second line); running eagerly' in err
    monkeypatch.setattr(inf, 'compile_supported', lambda dev: (False, 'no compiler'))
    with inference_engine(g, precision='fp32', compile=True) as run: assert not run.compiled
    assert 'not available' in capsys.readouterr().err

def test_colorize_files_hint_layers(tmp_path):
    "A hint model takes one RGBA layer per input from a folder (`<stem>.png`); none means no hints; a bad layer is one line."
    torch.manual_seed(0)
    g = UnetGenerator(ngf=4, size=32, hint_ch=4).eval()
    src = tmp_path/'in'; src.mkdir()
    for n in ('a', 'b', 'c'): sketch(40, 40).save(src/f'{n}.png')
    hd = tmp_path/'hints'; hd.mkdir()
    layer = Image.new('RGBA', (40, 40), (0, 0, 0, 0)); ImageDraw.Draw(layer).rectangle([5, 5, 30, 30], fill=(255, 0, 0, 255)); layer.save(hd/'a.png')
    Image.new('RGBA', (10, 10)).save(hd/'c.png')                          # wrong size for c.png
    logs = []
    w, _, f = colorize_files(g, sorted(src.iterdir()), tmp_path/'o', bs=4, precision='fp32', hints=hd, progress=False, log=logs.append)
    assert [p.name for p in w] == ['a.png', 'b.png'] and [p.name for p in f] == ['c.png'] and len(logs) == 1
    assert 'c.png' in logs[0] and 'does not match' in logs[0]
    hinted, plain = (np.asarray(Image.open(tmp_path/'o'/n), int) for n in ('a.png', 'b.png'))
    assert np.abs(hinted - plain).max() > 0                              # same sketch: only the hint differs
    assert np.array_equal(plain, np.asarray(colorize(g, sketch(40, 40), precision='fp32'), int))
    with pytest.raises(ValueError, match='not a folder'): colorize_files(g, [], tmp_path/'x', hints=tmp_path/'nope')
    with pytest.raises(ValueError, match='takes none'): colorize_files(UnetGenerator(ngf=4, size=32), [], tmp_path/'x', hints=hd)

def test_cli_batches_and_bad_flags(model_file, tmp_path):
    fn, _ = model_file
    src = _folder(tmp_path/'in', 5)
    r = cli(fn, src, '-o', tmp_path/'out', '--quiet', '--bs', 2, '--precision', 'fp32', '--channels_last')
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path/'out').iterdir()) == [f'{i}.png' for i in range(5)]
    r = cli(fn, src, '-o', tmp_path/'bad', '--precision', 'fp8')
    assert r.returncode == 2 and r.stderr.strip() == "pix2pix_colorize: error: precision='fp8': expected 'auto' or one of ['fp32', 'bf16', 'fp16']"
    assert not (tmp_path/'bad').exists()
