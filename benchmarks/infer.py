"""Inference speed and memory: images/s and peak memory of the pix2pix U-Net generator at 256, 512 and 1024 px, one
image at a time vs batched, fp32 vs bf16 autocast, channels_last off/on (each configuration in a fresh process, through
`pix2pix_nb.inference.inference_engine`, the code `colorize` and `pix2pix_colorize` run); a folder end to end through
`colorize_files` (decode, resize, network, PNG encode); and `torch.compile` with its compile time. Rewrites the
"infer" section of BENCHMARKS.md and writes benchmarks/infer.json.

    python benchmarks/infer.py              # ~8-12 min on 2 CPU cores; run it alone on the machine
    python benchmarks/infer.py --smoke      # seconds: tiny nets at 32 px, in one process after the first row (what tests/test_bench.py runs)
"""
import argparse, json, math, os, subprocess, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from mdsection import markers, write_section
from bench import PeakRSS, time_steps, med, machine, table

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = markers('infer')

def write_md(path, body): write_section(path, 'infer', '## Inference: batching, precision, memory', body)

def generator(ngf, train_size, seed=0):
    "The generator `colorize` would load: a U-Net trained at `train_size` (paper: ngf 64, 256 px, n_downs 8), eval mode."
    from pix2pix_nb.generator import UnetGenerator
    torch.manual_seed(seed)
    G = UnetGenerator(3, 3, ngf=ngf, size=train_size)
    with torch.no_grad():   # non-trivial BatchNorm statistics, as after training
        for m in G.modules():
            if isinstance(m, torch.nn.BatchNorm2d): m.running_mean.uniform_(-.1, .1); m.running_var.uniform_(.5, 2)
    return G.eval()

def _forward_worker(size, bs, precision, channels_last, n_img, ngf, train_size, dev):
    "In a fresh process: images/s of `inference_engine` on (bs, 3, size, size) batches, peak RSS, and the output's distance to fp32."
    from pix2pix_nb.inference import inference_engine
    G = generator(ngf, train_size)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(bs, 3, size, size, generator=g) * 2 - 1
    n = max(2, math.ceil(n_img / bs))
    with PeakRSS(dev) as m:
        with inference_engine(G, dev, precision, channels_last) as run: ts = time_steps(lambda i: run(x), n, 1, dev); y = run(x[:1])
    with inference_engine(G, dev, 'fp32', False) as run: ref = run(x[:1])
    return dict(size=size, bs=bs, precision=precision, channels_last=channels_last, s=med(ts), ips=bs / med(ts),
                peak=m.peak, extra=m.extra, diff=float((y - ref).abs().max()))

def _folder_worker(folder, bs, precision, channels_last, compile, ngf, train_size, dev, cache):
    "In a fresh process: `colorize_files` over a folder, wall time (compile included) and peak RSS."
    if cache: os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache   # a fresh, empty cache: the compile time is a cold one
    from pix2pix_nb.inference import colorize_files, expand_inputs
    G = generator(ngf, train_size)
    files = expand_inputs([folder])[0]
    with tempfile.TemporaryDirectory() as out, PeakRSS(dev) as m:
        t = time.perf_counter()
        w, s, f = colorize_files(G, files, out, bs=bs, precision=precision, channels_last=channels_last, compile=compile,
                                 progress=False, log=lambda s: None, device=dev)
        dt = time.perf_counter() - t
    assert len(w) == len(files) and not f, (len(w), f)
    return dict(n=len(files), bs=bs, precision=precision, channels_last=channels_last, compile=compile, s=dt, ips=len(files) / dt,
                peak=m.peak, extra=m.extra)

def _compile_worker(size, bs, n, ngf, train_size, dev, cache):
    "In a fresh process: compiled vs eager fp32 batches at one size: first-call time (compiling) and steady time per batch."
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache
    from pix2pix_nb.inference import inference_engine
    G = generator(ngf, train_size)
    x = torch.rand(bs, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with inference_engine(G, dev, 'fp32', False) as run: te = time_steps(lambda i: run(x), n, 1, dev); ref = run(x)
    with inference_engine(G, dev, 'fp32', False, compile=True) as run:
        t = time.perf_counter(); run(x); first = time.perf_counter() - t
        tc = time_steps(lambda i: run(x), n, 0, dev); y = run(x); compiled = run.compiled
    return dict(size=size, bs=bs, eager_s=med(te), compiled_s=med(tc), first_s=first, compile_s=max(first - med(tc), 0.),
                compiled=compiled, diff=float((y - ref).abs().max()))

IN_PROCESS = False   # --smoke: after the first call, run the workers here (a fresh process costs seconds of imports)

def in_fresh_process(fn, *args):
    global IN_PROCESS
    if IN_PROCESS: return json.loads(json.dumps(globals()[fn](*args)))
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import infer; "
            f"print(json.dumps(infer.{fn}(*{args!r})))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f'{fn}{args} failed: {r.stderr.strip().splitlines()[-3:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])

def sketches(folder, n, w, h):
    "`n` black-on-white building sketches of w×h px as PNGs."
    from PIL import Image, ImageDraw
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new('L', (w, h), 255); d = ImageDraw.Draw(im)
        d.rectangle([w // 12, h // 10, w - w // 12, h - 2], outline=0, width=max(1, w // 128))
        for r in range(3 + i % 3):
            for c in range(3 + i % 2):
                x0, y0 = w // 6 + c * w // 5, h // 5 + r * h // 6
                d.rectangle([x0, y0, x0 + w // 10, y0 + h // 12], outline=0, width=max(1, w // 256))
        im.save(folder/f'{i:03d}.png')
    return folder

def mib(b): return f'{b / 2**20:.0f}'
def label(r): return r['precision'] + (' + channels_last' if r['channels_last'] else '')

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--smoke', action='store_true', help='tiny nets at 32/64 px, a couple of batches: checks the code runs')
    p.add_argument('--device', default='cpu')
    p.add_argument('--no-compile', action='store_true', help='skip the torch.compile rows')
    p.add_argument('--md', default=str(ROOT/'BENCHMARKS.md')); p.add_argument('--json', default=None)
    a = p.parse_args(argv)
    dev, smoke = a.device, a.smoke
    t0 = time.time(); log = lambda *s: print(f'[{time.time()-t0:6.1f}s]', *s, flush=True)
    M = machine(); res = dict(machine=M, args=vars(a))
    from pix2pix_nb.callbacks import resolve_precision
    auto = resolve_precision('auto', None, dev)
    ngf, train = (8, 32) if smoke else (64, 256)
    global IN_PROCESS
    IN_PROCESS = False
    sizes = {32: 2} if smoke else {256: 8, 512: 4, 1024: 2}   # size: the batch size of the batched rows
    n_img = lambda s: 2 if smoke else (4 if s >= 1024 else 8)
    settings = [('fp32', False), ('fp32', True), ('bf16', False), ('bf16', True)]
    md = [f"Run: `python benchmarks/infer.py{' ' + ' '.join(argv) if argv else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n",
          f"Machine: {M['cpu']}, {M['cores']} logical cores ({M['isa']}), torch {M['torch']}, {M['threads']} threads; device `{dev}`; "
          f"load average at start {M['load']}. `precision='auto'` (the default of `colorize`, `colorize_files` and `pix2pix_colorize`) "
          f"resolves here to **{auto[0]}**{' + channels_last' if auto[1] else ''}.\n"]

    # 1. the network alone: size x batch x precision x layout
    fr, slow_bf16 = [], False
    for s, B in sizes.items():
        for bs in (1, B):
            for prec, cl in settings:
                if prec == 'bf16' and slow_bf16: continue   # bf16 far slower than fp32 here (no bf16 hardware): skip the long rows
                r = in_fresh_process('_forward_worker', s, bs, prec, cl, 1 if prec == 'bf16' else n_img(s), ngf, train, dev); fr.append(r)
                if prec == 'bf16' and not smoke and r['ips'] < 0.5 * fr[0]['ips']: slow_bf16 = True
                IN_PROCESS = smoke
                log('forward', s, bs, label(r), f"{r['ips']:.2f} img/s, peak {mib(r['peak'])} MiB, diff {r['diff']:.1e}")
    res['forward'] = fr
    base = {(r['size']): r for r in fr if r['bs'] == 1 and r['precision'] == 'fp32' and not r['channels_last']}
    rows = [[f"{r['size']} px", r['bs'], label(r), f"{r['ips']:.2f}", f"{r['ips'] / base[r['size']]['ips']:.2f}x",
             mib(r['peak']), mib(r['extra']), f"{r['diff']:.1e}"] for r in fr]
    best = {}
    for s in sizes:
        best[s] = max((r for r in fr if r['size'] == s), key=lambda r: r['ips'])
    res['best'] = {s: dict(bs=r['bs'], setting=label(r), ips=r['ips'], speedup=r['ips'] / base[s]['ips']) for s, r in best.items()}
    md += ['### The network alone: size × batch × precision × memory layout\n',
           f"`UnetGenerator` as trained at {train} px (ngf {ngf}, {int(math.log2(train))} down-sampling steps: what `colorize` loads), "
           "fed square inputs of each size (a larger sketch, or `--size` above the training size: the network is fully convolutional), "
           "eval mode, run through `inference_engine` (autocast, memory format; input moved, output returned as fp32 on the CPU). "
           "Every row runs in a fresh Python process: one warm-up batch, then the median batch time of "
           f"{'2' if smoke else 'at least 2 batches (8 images at 256/512 px, 4 at 1024 px)'}. *Peak*: resident memory of the process "
           "(psutil, sampled every 2 ms); *extra*: the peak minus the resident memory once the model is built, i.e. what the forward "
           "passes add. *max diff*: largest absolute difference of the first image's output from fp32 (outputs in [-1, 1]; one 8-bit "
           "level is 0.008).\n",
           table(['input', 'bs', 'precision', 'images/s', 'vs fp32 bs 1', 'peak MiB', 'extra MiB', 'max diff vs fp32'], rows), '']
    res['bf16_skipped'] = slow_bf16
    if slow_bf16: md += ["bf16 rows (timed on one image after the warm-up) stop after the first size: bf16 ran at under half the fp32 speed "
                         "here, so the other sizes, the batched bf16 rows and the bf16 folder row were skipped (minutes each, nothing to learn).\n"]

    # 2. a folder end to end
    fs, fbs = (64, 2) if smoke else (512, 8)
    n_files = 4 if smoke else 24
    rows, fo = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = sketches(Path(tmp)/'in', n_files, fs, fs)
        cfgs = [(1, 'fp32', False, False), (fbs, 'fp32', False, False), (fbs, 'fp32', True, False)] + ([] if slow_bf16 else [(fbs, 'bf16', True, False)])
        for bs, prec, cl, comp in cfgs:
            cache = tempfile.mkdtemp(dir=tmp) if comp else None
            r = in_fresh_process('_folder_worker', str(folder), bs, prec, cl, comp, ngf, train, dev, cache); fo.append(r)
            log('folder', bs, label(r), 'compile' if comp else '', f"{r['s']:.1f} s, {r['ips']:.2f} img/s")
        b1 = fo[0]['ips']
        rows = [[r['bs'], label(r) + (' + compile' if r['compile'] else ''), f"{r['s']:.1f}", f"{r['ips']:.2f}", f"{r['ips'] / b1:.2f}x",
                 mib(r['peak']), mib(r['extra'])] for r in fo]
        res['folder'] = fo
        md += ['### A folder end to end (`colorize_files`, what `pix2pix_colorize` runs)\n',
               f"{n_files} PNG sketches of {fs}×{fs} px (resized to the {train} px training size, as `colorize` does), the same generator; "
               "wall time of the whole call: decode, resize, pad, network, crop, resize back, PNG encode and atomic write. "
               "Each row in a fresh process.\n",
               table(['bs', 'settings', 'seconds', 'images/s', 'vs bs 1 fp32', 'peak MiB', 'extra MiB'], rows), '']

        # 3. torch.compile: compile time vs steady gain
        if not a.no_compile:
            cs, cb = (32, 4) if smoke else (256, 8)
            try: c = in_fresh_process('_compile_worker', cs, cb, 2 if smoke else 3, ngf, train, dev, tempfile.mkdtemp(dir=tmp))
            except RuntimeError as e: c = None; res['compile'] = str(e); md += [f'### `torch.compile`\n', f'Failed: {e}\n']; log('compile failed', e)
        if not a.no_compile and c is not None:
            gain = (c['eager_s'] - c['compiled_s']) / cb
            c['break_even_images'] = c['compile_s'] / gain if gain > 0 else None
            res['compile'] = c
            log('compile', f"eager {c['eager_s']:.2f} s, compiled {c['compiled_s']:.2f} s per batch, compile {c['compile_s']:.0f} s")
            md += [f'### `torch.compile` (fp32, {cs} px, bs {cb})\n',
                   "`inference_engine(compile=True)` in a fresh process whose Inductor cache starts empty (a cold compile, as on a "
                   "user's first run): the first batch's time minus a compiled batch's is the compile time; *repaid after*: images "
                   "needed before the per-image saving covers it.\n",
                   table(['eager s/batch', 'compiled s/batch', 'compiled vs eager', 'compile time (cold cache)', 'repaid after', 'max diff vs eager'],
                         [[f"{c['eager_s']:.3f}", f"{c['compiled_s']:.3f}", f"{c['eager_s'] / c['compiled_s']:.2f}x", f"{c['compile_s']:.0f} s",
                           f"{c['break_even_images']:.0f} images" if c['break_even_images'] else 'never (not faster)', f"{c['diff']:.1e}"]]), '']

    md.append(f'GPU figures: not measured (no GPU lent to this task).\n\nTotal wall time: {time.time()-t0:.0f} s.')
    write_md(a.md, '\n'.join(md))
    js = Path(a.json) if a.json else (ROOT/'benchmarks'/'infer.json' if Path(a.md).resolve() == (ROOT/'BENCHMARKS.md').resolve() else Path(a.md).with_suffix('.infer.json'))
    js.write_text(json.dumps(res, indent=1, default=str)); log('wrote', a.md, js)
    return res

if __name__ == '__main__': main()
