"""Training performance against the reference algorithm: the reference's plain fp32 loop vs `fit`'s defaults (and
`fit(compile=True)`) at 128 and 256 px, batch 1 and 4, in one run; where the time of the default step goes
(`torch.profiler`, top operators by self time); step time and peak memory as the work grows. Rewrites the
"perf" section of BENCHMARKS.md and writes benchmarks/perf.json.

    python benchmarks/perf.py              # ~15-25 min on 2 CPU cores; run it alone on the machine
    python benchmarks/perf.py --smoke      # seconds: tiny nets at 32 px (what tests/test_bench.py runs)
"""
import argparse, json, math, os, subprocess, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from mdsection import markers, write_section
import bench
from bench import (PlainPix2Pix, pix2pix_nets, batches, time_steps, med, matmul_rate, step_flops, run_fit, machine,
                   max_rel_diff, PeakRSS, table, gf, ok)

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = markers('perf')

def write_md(path, body): write_section(path, 'perf', '## Training performance vs the reference algorithm', body)

def fit_defaults(dev):
    "What `fit(precision='auto')` resolves to on `dev` (precision, channels_last); fused Adam is fit's default."
    from pix2pix_nb.callbacks import resolve_precision
    return resolve_precision('auto', None, dev)

def reference_vs_fit(cfg, n, warmup, dev, compile_too=True):
    "Reference plain fp32 loop (default Adam) vs `fit` defaults (+ compile): ms/step, losses after warmup+n steps, compile time."
    from pix2pix_nb.callbacks import CompileNets
    prec, cl = fit_defaults(dev)
    out = {}
    tp, lp = bench.run_plain(cfg, n, warmup, dev=dev)                                            # the reference algorithm
    tf, lf = run_fit(cfg, n, warmup, precision=prec, channels_last=cl, dev=dev, fused=True)      # fit's defaults
    out['reference'] = dict(s=med(tp), losses=lp)
    out['fit'] = dict(s=med(tf), losses={k: float(v) for k, v in lf.items()})
    if compile_too:
        cn = CompileNets()
        tc, lc = run_fit(cfg, n, warmup, precision=prec, channels_last=cl, dev=dev, fused=True, extra_cbs=[cn])
        out['fit + compile'] = dict(s=med(tc), losses={k: float(v) for k, v in lc.items()}, compile_s=cn.compile_s, compiled=cn.compiled)
    tp2, _ = bench.run_plain(cfg, n, warmup, dev=dev)                                            # ABBA-ish: the reference again
    out['reference']['s'] = med(tp + tp2)
    for k, v in out.items(): v['rel'] = max_rel_diff(v['losses'], lp)
    return out, (prec, cl)

def profile_step(cfg, dev, steps=3, top=12, precision='fp32', channels_last=False):
    "torch.profiler over `steps` plain-loop steps with the given settings and fused Adam: top ops by self CPU time."
    from torch.profiler import profile, ProfilerActivity
    G, D = pix2pix_nets(cfg['size'], cfg['ngf'], cfg['ndf'], seed=0)
    loop = PlainPix2Pix(G, D, dtype=torch.bfloat16 if precision == 'bf16' else None, channels_last=channels_last, opt='fused', dev=dev)
    bs = batches(cfg['size'], cfg['bs'], dev=dev)
    for i in range(2): loop.step(*bs[i % 4])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(dev).type == 'cuda' else [])
    with profile(activities=acts) as prof:
        for i in range(steps): loop.step(*bs[i % 4])
    ev = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ev)
    ev.sort(key=lambda e: -e.self_cpu_time_total)
    return dict(total_ms=total / 1e3 / steps,
                top=[dict(op=e.key, ms=e.self_cpu_time_total / 1e3 / steps, share=e.self_cpu_time_total / total, calls=e.count // steps) for e in ev[:top]])

def _scale_worker(size, bs, ngf, n, dev):
    "In a fresh process: plain-loop step time (fp32, fused Adam) and peak RSS for one (size, bs)."
    cfg = dict(size=size, bs=bs, ngf=ngf, ndf=ngf)
    with PeakRSS(dev) as m:
        G, D = pix2pix_nets(size, ngf, ngf, seed=0)
        loop = PlainPix2Pix(G, D, opt='fused', dev=dev); b = batches(size, bs, dev=dev)
        ts = time_steps(lambda i: loop.step(*b[i % 4]), n, 1, dev)
    return dict(size=size, bs=bs, s=med(ts), peak=m.peak, extra=m.extra)

def scale(size, bs, ngf, n, dev):
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import perf; "
            f"print(json.dumps(perf._scale_worker({size}, {bs}, {ngf}, {n}, {dev!r})))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f'scaling run {size} px bs {bs} failed: {r.stderr.strip().splitlines()[-1:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])

def slope(xs, ys) -> float:
    "Least-squares slope of log(y) against log(x)."
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--smoke', action='store_true', help='tiny nets at 32/64 px, a couple of steps: checks the code runs')
    p.add_argument('--device', default='cpu')
    p.add_argument('--no-compile', action='store_true', help='skip the compiled rows')
    p.add_argument('--md', default=str(ROOT/'BENCHMARKS.md')); p.add_argument('--json', default=None)
    a = p.parse_args(argv)
    dev, smoke = a.device, a.smoke
    t0 = time.time(); log = lambda *s: print(f'[{time.time()-t0:6.1f}s]', *s, flush=True)
    M = machine(); res = dict(machine=M, args=vars(a))
    ngf = 8 if smoke else 64
    W, N = (1, 2) if smoke else (2, 5)
    n_mm = 256 if smoke else 2048
    rate = {k: matmul_rate(dt, n_mm, 3 if smoke else 10, dev) for k, dt in (('fp32', torch.float32), ('bf16', torch.bfloat16))}
    res['matmul'] = rate; log('matmul', {k: gf(v) for k, v in rate.items()})
    prec, cl = fit_defaults(dev)
    md = [f"Run: `python benchmarks/perf.py{' ' + ' '.join(argv) if argv else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n",
          f"Machine: {M['cpu']}, {M['cores']} logical cores ({M['isa']}), torch {M['torch']}, {M['threads']} threads; device `{dev}`; "
          f"load average at start {M['load']}. Matmul rate (torch.mm {n_mm}²): fp32 **{gf(rate['fp32'])}**, bf16 **{gf(rate['bf16'])}** GFLOP/s. "
          f"`fit(precision='auto')` resolves here to **{prec}**{' + channels_last' if cl else ''} (+ fused Adam, `fit`'s default).\n"]

    # 1. reference vs fit (and compile), 128/256 px, bs 1/4
    sizes = [(32, 1), (32, 4)] if smoke else [(128, 1), (128, 4), (256, 1), (256, 4)]
    rows, rr = [], {}
    for s, b in sizes:
        cfg = dict(size=s, bs=b, ngf=ngf, ndf=ngf)
        fl = step_flops(cfg, dev)
        r, _ = reference_vs_fit(cfg, N, W, dev, compile_too=not a.no_compile)
        ref = r['reference']['s']
        for name, v in r.items():
            v['ratio'] = ref / v['s']; v['ips'] = b / v['s']; v['frac32'] = fl / v['s'] / rate['fp32']; v['frac16'] = fl / v['s'] / rate['bf16']
            brk = ''
            if name == 'fit + compile' and v.get('compile_s') is not None:
                gain = r['fit']['s'] - v['s']
                v['break_even_steps'] = v['compile_s'] / gain if gain > 0 else None
                brk = f"{v['compile_s']:.0f} s; " + (f"pays off after {v['break_even_steps']:.0f} steps" if gain > 0 else 'never pays off (slower)')
            rows.append([f'{s} px, bs {b}', name, f"{v['s']*1e3:.0f}", f"{v['ips']:.2f}", f"{v['ratio']:.2f}x",
                         f"{100*v['frac32']:.0f}%", f"{100*v['frac16']:.0f}%", f"{v['rel']:.1e}", brk])
        rr[f'{s}_{b}'] = dict(flops=fl, **r)
        log('ref vs fit', s, b, {k: f"{v['s']*1e3:.0f} ms, {v['ratio']:.2f}x" for k, v in r.items()})
    res['reference_vs_fit'] = rr
    md += ['### The reference algorithm vs `fit`, same run\n',
           "*reference*: the reference implementation's update as a plain PyTorch loop (eager, fp32, torch's default Adam; "
           "timed twice, before and after the `fit` rows, medians pooled). *fit*: what `fit` builds with its defaults on this device. "
           f"*fit + compile*: the same with `CompileNets` (`fit(compile=True)`): the step after compiling; the compile time is reported apart "
           f"with the number of steps after which it is repaid. U-Net + 70×70 PatchGAN, ngf/ndf {ngf}, pre-made in-memory batches, "
           f"median of {N} steps after {W} warm-up steps. *loss diff*: max relative difference of the four losses after {W+N} steps from the reference "
           "(dropout on: compiled code draws the same masks).\n",
           table(['config', 'path', 'ms/step', 'img/s', 'vs reference', 'of fp32 matmul', 'of bf16 matmul', 'loss diff', 'compile time'], rows)]

    # 2. where the time goes
    md += ['\n### Where the default step spends its time (`torch.profiler`, self CPU time per step)\n']
    pr = {}
    for s in ([32] if smoke else [128, 256]):
        cfg = dict(size=s, bs=1, ngf=ngf, ndf=ngf)
        for pname, (pp, pcl) in {f'{prec}' + (' + channels_last' if cl else ''): (prec, cl), **({} if prec == 'bf16' else {'bf16 + channels_last': ('bf16', True)})}.items():
            p_ = profile_step(cfg, dev, 2 if smoke else 3, precision=pp, channels_last=pcl)
            pr[f'{s} {pname}'] = p_
            md += [f"**{s} px, bs 1, {pname}** (+ fused Adam): {p_['total_ms']:.0f} ms of operator self time per step.\n",
                   table(['operator', 'ms/step', 'share', 'calls/step'], [[f"`{t['op']}`", f"{t['ms']:.1f}", f"{100*t['share']:.1f}%", t['calls']] for t in p_['top']]), '']
            log('profile', s, pname, f"{p_['total_ms']:.0f} ms")
    res['profile'] = pr

    # 3. cost as work grows
    grid = [(32, 1), (64, 1), (32, 4)] if smoke else [(64, 1), (128, 1), (256, 1), (512, 1), (128, 4), (128, 16)]
    rows, sr = [], []
    for s, b in grid:
        r = scale(s, b, ngf, 2 if smoke else (2 if s >= 512 or b >= 16 else 3), dev); sr.append(r)
        rows.append([f'{s} px', b, f"{r['s']*1e3:.0f}", f"{b/r['s']:.2f}", f"{r['peak']/2**20:.0f}", f"{r['extra']/2**20:.0f}"])
        log('scale', s, b, f"{r['s']*1e3:.0f} ms, peak {r['peak']/2**20:.0f} MiB")
    res['scaling'] = sr
    one = [r for r in sr if r['bs'] == 1 and r['size'] >= (64 if not smoke else 32)]
    k_pix = slope([r['size'] ** 2 for r in one], [r['s'] for r in one])
    at = [r for r in sr if r['size'] == (32 if smoke else 128)]
    k_bs = slope([r['bs'] for r in at], [r['s'] for r in at]) if len({r['bs'] for r in at}) > 1 else float('nan')
    res['slopes'] = dict(pixels=k_pix, batch=k_bs)
    md += ['### Step time and peak memory as the work grows (plain loop, fp32 + fused Adam, each in a fresh process)\n',
           f"Peak: resident memory of the process (psutil, sampled every 2 ms); extra: peak minus the memory before the networks were built. "
           f"Fitted slopes (log-log): step time ∝ pixels^**{k_pix:.2f}** at bs 1 (1.0 = linear in pixels; small sizes are dominated by "
           f"per-layer overheads), ∝ batch^**{k_bs:.2f}** at {at[0]['size']} px.\n",
           table(['size', 'bs', 'ms/step', 'img/s', 'peak MiB', 'extra MiB'], rows)]

    # targets
    def get(s, b, k): return rr.get(f'{s}_{b}', {}).get(k)
    targets = []
    for s in ([32] if smoke else [128, 256]):
        f = get(s, 1, 'fit')
        targets.append((f'default `fit` step >= 3.0x the reference loop at {s} px, bs 1 (losses within 1e-2 after {W+N} steps)',
                        f"{f['ratio']:.2f}x (loss diff {f['rel']:.1e})", f['ratio'] >= 3.0 and f['rel'] <= 1e-2))
    key = f"{32 if smoke else 256} bf16 + channels_last"
    bf = rr.get(f'{32 if smoke else 256}_1')
    fl256 = bf['flops'] if bf else None
    bf_ms = None
    if prec == 'bf16' and bf: bf_ms = bf['fit']['s']
    if bf_ms is None:   # bf16 isn't fit's default here: time the bf16 step through fit's machinery once
        cfg = dict(size=32 if smoke else 256, bs=1, ngf=ngf, ndf=ngf)
        tb, _ = run_fit(cfg, N, W, precision='bf16', channels_last=True, dev=dev, fused=True); bf_ms = med(tb)
    frac_bf = fl256 / bf_ms / rate['bf16']
    targets.append((f"bf16 step >= 25% of the bf16 matmul rate at {32 if smoke else 256} px", f"{100*frac_bf:.1f}% ({bf_ms*1e3:.0f} ms/step)", frac_bf >= 0.25))
    res['targets'] = [dict(target=t, value=v, met=m) for t, v, m in targets]
    md[2:2] = ['### Targets (this run)\n', table(['target', 'measured', 'status'], [[t, v, ok(m)] for t, v, m in targets]), '']
    md.append(f'\nGPU figures: not measured (no GPU lent to this task).\n\nTotal wall time: {time.time()-t0:.0f} s.')
    write_md(a.md, '\n'.join(md))
    js = Path(a.json) if a.json else (ROOT/'benchmarks'/'perf.json' if Path(a.md).resolve() == (ROOT/'BENCHMARKS.md').resolve() else Path(a.md).with_suffix('.perf.json'))
    js.write_text(json.dumps(res, indent=1, default=str)); log('wrote', a.md, js)
    return res

if __name__ == '__main__': main()
