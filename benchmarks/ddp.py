"""Data-parallel training on this machine: one process vs two under torchrun (gloo), images/s and the share of a
training step spent in gradient communication. Rewrites the DDP block of BENCHMARKS.md and benchmarks/ddp.json.

    python benchmarks/ddp.py                        # the cpu-demo configuration (128 px, ngf/ndf 32, 4 images per process)
    python benchmarks/ddp.py --smoke --md /tmp/b.md # seconds: 32 px, tiny nets, two timed steps (tests/test_train_ddp.py)

Run it alone: every other process on the cores distorts the figures (`flock /tmp/cpu.lock python benchmarks/ddp.py`).
Each configuration runs in fresh processes: `python benchmarks/ddp.py --worker ...` for one process, the same under
`python -m torch.distributed.run --standalone --nproc_per_node 2` for two. A step is the interval between consecutive
`after_batch` events of `pix2pix_learner` + `DistributedGAN` (fit's trainer and callbacks), fed pre-made in-memory
batches, so data loading is not timed; medians after warm-up steps.
"""
import argparse, contextlib, gc, json, os, platform, re, statistics, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from mdsection import markers, write_section

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = markers('ddp')
TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID')

# name: (processes, threads per process, batch per process, mode)
CONFIGS = {
    '1 process, 1 thread':                     (1, 1, 1, 'plain'),
    '1 process, 2 threads, double batch':      (1, 2, 2, 'plain'),
    '2 processes (DDP)':                       (2, 1, 1, 'ddp'),
    '2 processes (DDP), all-reduces timed':    (2, 1, 1, 'timed'),
    '2 processes, no all-reduce (`no_sync`)':  (2, 1, 1, 'nosync'),
    '2 processes, `find_unused_parameters`':   (2, 1, 1, 'unused'),
}

# ---------------------------------------------------------------- worker (one training process)
def worker(a):
    import torch, torch.distributed as dist
    from fastai.callback.core import Callback, CancelFitException
    from fastai.callback.progress import ProgressCallback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from pix2pix_nb.core import get_device
    from pix2pix_nb.gan import pix2pix_learner, pix2pix_nets
    from pix2pix_nb.callbacks import precision_callbacks, resolve_precision
    from pix2pix_nb.distributed import ddp_setup, ddp_cleanup, DistributedGAN
    torch.set_num_threads(a.threads)
    ddp = a.mode != 'plain'
    rank, world = ddp_setup() if ddp else (0, 1)
    n = (a.warmup + a.steps + 1) * a.bs * world                      # enough pairs for every step on every rank
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.rand(3, a.size, a.size, generator=g) * 2 - 1, torch.rand(3, a.size, a.size, generator=g) * 2 - 1) for _ in range(n)]
    dls = DataLoaders(DataLoader(pairs, bs=a.bs, shuffle=True, drop_last=True), DataLoader(pairs[:a.bs], bs=a.bs))
    G, D = pix2pix_nets(a.size, a.ngf, a.ndf, a.n_layers, seed=0)
    precision, cl = resolve_precision(a.precision, None, get_device('cpu'))
    comm, steps = [], []

    class Timer(Callback):
        "Time of every training step (after_batch to after_batch); stop after warm-up + timed steps."
        order = 100
        def before_fit(self):
            if a.mode == 'timed':                                      # time every bucket's all-reduce, launch to done (a Python comm hook)
                for m in self.learn.model.children(): m.register_comm_hook(None, timed_allreduce)
            self.t = time.perf_counter()
        def after_batch(self):
            if not self.training: return
            t = time.perf_counter(); steps.append((self.t, t)); self.t = t
            if len(steps) == a.warmup + a.steps: raise CancelFitException

    def timed_allreduce(state, bucket):
        t0, buf = time.perf_counter(), bucket.buffer()
        fut = dist.all_reduce(buf.div_(world), async_op=True).get_future()
        def done(f): comm.append((t0, time.perf_counter(), buf.numel() * buf.element_size())); return f.value()[0]
        return fut.then(done)

    class NoSync(Callback):
        "Every DDP wrapper in `no_sync` for the whole batch: no gradient all-reduce (the ranks drift apart: timing only)."
        order = Timer.order - 1 # leave no_sync before Timer stops the fit: an open context would keep the DDP wrappers alive
        def before_batch(self):
            self.stack = contextlib.ExitStack()
            for m in self.learn.model.children(): self.stack.enter_context(m.no_sync())
        def after_batch(self): self.stack.close(); self.stack = None

    cbs = [Timer()] + precision_callbacks(precision, cl)
    if ddp: cbs += [DistributedGAN(find_unused_parameters=a.mode == 'unused')]
    if a.mode == 'nosync': cbs += [NoSync()]
    learn = pix2pix_learner(dls, G, D, cbs=cbs)
    learn.remove_cb(ProgressCallback); learn.logger = lambda *x: None
    learn.fit(1)
    del learn, cbs; gc.collect() # no DDP wrapper may outlive the process group (its destructor at exit would abort)
    timed = steps[a.warmup:]
    step_s = statistics.median(t1 - t0 for t0, t1 in timed)
    busy, nbytes = [], []
    for t0, t1 in timed:                                               # union of the buckets' all-reduce intervals in each step
        iv = sorted((max(s, t0), min(e, t1)) for s, e, _ in comm if e > t0 and s < t1)
        tot, end = 0., t0
        for s, e in iv: tot += max(0., e - max(s, end)); end = max(end, e)
        busy.append(tot); nbytes.append(sum(b for s, e, b in comm if t0 <= e <= t1))
    res = dict(rank=rank, world=world, step_s=step_s, comm_s=statistics.median(busy) if comm else 0.,
               buckets=sum(1 for s, e, b in comm if timed[0][0] <= e <= timed[0][1]), bytes=max(nbytes) if comm else 0, precision=precision)
    if ddp:
        out = [None] * world; dist.all_gather_object(out, res); res = out
        ddp_cleanup()
    else: res = [res]
    if rank == 0: Path(a.out).write_text(json.dumps(res))

# ---------------------------------------------------------------- driver
def run_config(name, args, tmp):
    procs, threads, bs_mult, mode = CONFIGS[name]
    out = tmp/f'{re.sub(r"[^a-z0-9]+", "_", name.lower())}.json'
    flags = ['--worker', '--mode', mode, '--threads', threads, '--bs', args.bs * bs_mult, '--size', args.size, '--ngf', args.ngf,
             '--ndf', args.ndf, '--n_layers', args.n_layers, '--steps', args.steps, '--warmup', args.warmup, '--precision', args.precision, '--out', out]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | dict(OMP_NUM_THREADS=str(threads))
    launch = [sys.executable] if procs == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(procs)]
    r = subprocess.run(launch + [str(Path(__file__).resolve())] + [str(f) for f in flags], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        err = '\n'.join(l for l in r.stderr.splitlines() if 'Warning' not in l and 'warnings.warn' not in l)
        raise RuntimeError(f'{name} failed (exit status {r.returncode}):\n{err[:4000]}\n...\n{err[-3000:]}')
    ranks = json.loads(out.read_text())
    step = max(x['step_s'] for x in ranks)                             # the ranks run in lockstep; take the slower
    return dict(processes=procs, threads=threads, bs=args.bs * bs_mult, global_bs=args.bs * bs_mult * procs, mode=mode,
                step_s=step, img_s=args.bs * bs_mult * procs / step, comm_s=max(x['comm_s'] for x in ranks),
                buckets=ranks[0]['buckets'], bytes=ranks[0]['bytes'], precision=ranks[0]['precision'])

def markdown(res, args, meta):
    base, ddp, nosync, timed = (res[k] for k in ('1 process, 1 thread', '2 processes (DDP)', '2 processes, no all-reduce (`no_sync`)',
                                                 '2 processes (DDP), all-reduces timed'))
    rows = ['| configuration | processes × threads | images per step (per process) | ms/step | img/s | vs 1 process, 1 thread |', '|---|---|---|---|---|---|']
    for k, r in res.items():
        rows.append(f"| {k} | {r['processes']} × {r['threads']} | {r['global_bs']} ({r['bs']}) | {r['step_s']*1e3:.0f} | {r['img_s']:.2f} | {r['img_s']/base['img_s']:.2f}x |")
    exposed = max(0., ddp['step_s'] - nosync['step_s'])
    return '\n'.join([
        f"Run: `python benchmarks/ddp.py{' ' + ' '.join(meta['argv']) if meta['argv'] else ''}` on {meta['date']}, alone on the machine (`flock`).",
        '',
        f"Machine: {meta['cpu']}, {meta['cores']} logical cores, torch {meta['torch']}, gloo over loopback; device `cpu`; "
        f"load average {' '.join(map(str, meta['load']))} at the start, {' '.join(map(str, meta['load_end']))} at the end. "
        f"**Two processes on two shared cores is all this machine allows**: each process gets one core (and one thread), "
        f"gloo's communication threads share the same two cores.",
        '',
        f"Configuration: pix2pix U-Net + PatchGAN, {args.size} px, ngf/ndf {args.ngf}/{args.ndf}, n_layers {args.n_layers}, "
        f"{args.bs} images per process, precision `{base['precision']}` (what `fit(precision='auto')` picks here), fused Adam; "
        f"`pix2pix_learner` + `DistributedGAN`, in-memory batches; median of {args.steps} steps after {args.warmup} warm-up steps, "
        f"every configuration in fresh processes, {args.rounds} round(s) round-robin, the faster round kept (ms/step of each round in `benchmarks/ddp.json`).",
        '',
        *rows,
        '',
        f"Gradient communication ({timed['buckets']} buckets, {timed['bytes']/2**20:.1f} MiB all-reduced per step, G and D). The busy time comes "
        f"from the run whose all-reduces go through a timing comm hook (the *timed* row); the exposed time is the difference of two step times, "
        f"plain DDP minus the same processes skipping the all-reduce, per round: {', '.join(f'{d - n} ms' for d, n in zip(ddp['rounds_ms'], nosync['rounds_ms']))}:",
        '',
        '| measure | ms/step | share of the DDP step |', '|---|---|---|',
        f"| all-reduce busy time (each bucket from launch to done, union per step; partly overlapped with the backward pass) | {timed['comm_s']*1e3:.0f} | {timed['comm_s']/timed['step_s']:.0%} |",
        f"| exposed communication (DDP step − `no_sync` step, faster rounds) | {exposed*1e3:.0f} | {exposed/ddp['step_s']:.0%} |",
        '',
        'GPU figures: not measured (no GPU lent to this task).',
    ])

def write_md(path, body): write_section(path, 'ddp', '## Data-parallel training (DDP): 1 vs 2 processes', body)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--mode', default='plain', help=argparse.SUPPRESS)
    p.add_argument('--threads', type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help=argparse.SUPPRESS)
    p.add_argument('--smoke', action='store_true', help='32 px, tiny nets, 2 timed steps: checks the harness, measures nothing')
    p.add_argument('--size', type=int, default=128); p.add_argument('--bs', type=int, default=4)
    p.add_argument('--ngf', type=int, default=32); p.add_argument('--ndf', type=int, default=32); p.add_argument('--n_layers', type=int, default=3)
    p.add_argument('--steps', type=int, default=16); p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--rounds', type=int, default=1, help='run every configuration this many times (round-robin) and keep its fastest run')
    p.add_argument('--precision', default='auto')
    p.add_argument('--md', default=str(ROOT/'BENCHMARKS.md')); p.add_argument('--json', default=None)
    p.add_argument('--render', default=None, help='rewrite the markdown block from a saved ddp.json instead of measuring')
    a = p.parse_args(argv)
    if a.worker: return worker(a)
    if a.render:
        js = json.loads(Path(a.render).read_text()); saved = argparse.Namespace(**js['args'])
        body = markdown(js['results'], saved, js['meta']) + f"\n\nTotal wall time: {js['meta']['wall_s']} s."
        write_md(a.md, body); print(body); return js['results']
    if a.smoke: a.size, a.ngf, a.ndf, a.n_layers, a.steps, a.warmup, a.rounds = 32, 8, 8, 2, 2, 1, 1
    import tempfile, torch
    t0, load0 = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rounds = {name: [] for name in CONFIGS}
        for i in range(a.rounds):                                      # round-robin: a slow spell of the machine hits every configuration
            for name in CONFIGS:
                r = run_config(name, a, Path(tmp)); rounds[name].append(r)
                print(f"round {i+1}, {name}: {r['step_s']*1e3:.0f} ms/step, {r['img_s']:.2f} img/s", flush=True)
        res = {name: min(rs, key=lambda r: r['step_s']) | dict(rounds_ms=[round(r['step_s'] * 1e3) for r in rs]) for name, rs in rounds.items()}
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor()) if Path('/proc/cpuinfo').exists() else platform.processor()
    meta = dict(argv=[x for x in (sys.argv[1:] if argv is None else argv) if not x.startswith('--md') and not x.endswith('.md')], date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, wall_s=round(time.time() - t0),
                load=[round(x, 2) for x in load0], load_end=[round(x, 2) for x in os.getloadavg()])
    body = markdown(res, a, meta) + f"\n\nTotal wall time: {meta['wall_s']} s."
    write_md(a.md, body)
    js = Path(a.json) if a.json else (Path(a.md).with_name('ddp.json') if a.smoke else ROOT/'benchmarks'/'ddp.json')
    js.write_text(json.dumps(dict(meta=meta, args=vars(a), results=res), indent=1, default=str))
    print(body)
    return res

if __name__ == '__main__': main()
