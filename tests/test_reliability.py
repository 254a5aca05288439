"""Reliability (#14): preemption (SIGTERM) through the real command line with a bit-exact resume, crash-safe checkpoints
(`kill -9` mid-write, a full disk), one run per output folder, and hostile images that must not blow up memory."""
import os, sys, json, time, errno, signal, socket, struct, zlib, subprocess, multiprocessing
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from safetensors.torch import load_file
from pix2pix_nb.data import synthetic_facades
from pix2pix_nb.callbacks import (read_checkpoint, acquire_run_lock,
                                  release_run_lock, check_run_lock, RunLockedError, LOCK_NAME)
from pix2pix_nb.cli import pix2pix_train, EXIT_INTERRUPTED

def env(**kw):
    "The environment of a child process: the same number of torch threads as here (results must match bit for bit)."
    return dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED='1', **kw)

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return synthetic_facades(tmp_path_factory.mktemp('rel')/'tiny', n_train=8, n_val=4, n_test=2, size=32)

def train_args(data, out, *extra):
    return ['--source', data, '--out', out, '--size', 32, '--bs', 2, '--ngf', 8, '--ndf', 8, '--n_layers', 2, '--n_grid', 2,
            '--num_workers', 0, '--save_every', 1, '--precision', 'fp32', '--epochs', 3, '--epochs_decay', 1, *extra]

# A `pix2pix_train` that holds still after training batch 1 of epoch 1 (touching MARK) until a signal has arrived: the test's
# SIGTERM then lands mid-epoch every time, with no race against the clock. Everything else is the real console script.
PAUSED_TRAIN = '''
import sys, time
from pathlib import Path
from fastai.callback.core import Callback
import pix2pix_nb.train as T
mark = Path(sys.argv[1])
class PauseAt(Callback):
    def after_batch(self):
        if self.training and getattr(self.learn, 'epoch_offset', 0) + self.epoch == 1 and self.iter == 1:
            mark.touch(); t0 = time.time()
            while self.learn.checkpoint._stop is None and time.time() - t0 < 120: time.sleep(0.01)
run_callbacks = T.run_callbacks
T.run_callbacks = lambda *a, **k: run_callbacks(*a, **k) + [PauseAt()]
from pix2pix_nb.cli import pix2pix_train
sys.exit(pix2pix_train(sys.argv[2:]))
'''

def start_paused(tmp_path, args):
    script, mark = tmp_path/'paused_train.py', tmp_path/'paused.mark'
    script.write_text(PAUSED_TRAIN)
    p = subprocess.Popen([sys.executable, script, mark, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env())
    t0 = time.time()
    while not mark.exists():
        if p.poll() is not None: pytest.fail(f'training ended before the pause (exit {p.returncode}): {p.stderr.read()[-3000:]}')
        if time.time() - t0 > 240: p.kill(); pytest.fail('training did not reach the pause in 240 s')
        time.sleep(0.05)
    return p

def nets(ck): return {f'{n}.{k}': v for n, sd in read_checkpoint(ck)['nets'].items() for k, v in sd.items()}

def test_sigterm_mid_epoch_then_resume_is_bit_exact(tiny, tmp_path, capsys):
    "Preemption: SIGTERM from outside mid-epoch -> checkpoint with the batch position, exit 130; `--resume last` ends bit-identical."
    out = tmp_path/'run'
    p = start_paused(tmp_path, train_args(tiny, out))
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == EXIT_INTERRUPTED == 130, stderr[-3000:]
    assert 'SIGTERM: finishing this batch' in stdout and 'Traceback' not in stderr
    assert stderr.strip().splitlines()[-1] == 'pix2pix_train: interrupted by SIGTERM: checkpoint saved; run the same command with --resume last to continue'
    ck = read_checkpoint(out/'checkpoint.pt')
    assert (ck['epoch'], ck['batch']) == (1, 2) and 'epoch_rng' in ck
    assert not (out/'generator.safetensors').exists()                          # an interrupted run exports nothing
    assert pix2pix_train(train_args(tiny, out, '--resume', 'last')) == 0       # continue (in this process)
    assert pix2pix_train(train_args(tiny, tmp_path/'ref')) == 0               # the same run, never interrupted
    assert read_checkpoint(out/'checkpoint.pt')['epoch'] == 3
    a, b = load_file(out/'generator.safetensors'), load_file(tmp_path/'ref'/'generator.safetensors')
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    a, b = nets(out/'checkpoint.pt'), nets(tmp_path/'ref'/'checkpoint.pt')  # the discriminator too
    assert [k for k in a if not torch.equal(a[k], b[k])] == []

def test_second_run_on_the_same_folder_is_refused(tiny, tmp_path, capsys):
    "While a run trains in OUT, another one on OUT stops at once with one line naming the folder and the process; after it, OUT is free."
    out = tmp_path/'run'
    p = start_paused(tmp_path, train_args(tiny, out))
    try:
        before = (out/'config.json').read_text()
        assert pix2pix_train(train_args(tiny, out, '--epochs_decay', 2)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f'pix2pix_train: error: run folder {out} is in use by another run (pid {p.pid} on host {socket.gethostname()}'), err
        assert (out/'config.json').read_text() == before                       # nothing of the first run was touched
    finally:
        p.send_signal(signal.SIGTERM); p.communicate(timeout=120)
    assert p.returncode == EXIT_INTERRUPTED and not (out/LOCK_NAME).exists()    # the interrupted run released its lock
    assert pix2pix_train(train_args(tiny, out, '--resume', 'last')) == 0

KEEP_SAVING = '''
import sys, torch
from pix2pix_nb.callbacks import atomic_save, CKPT_FORMAT
i = 0
while True:
    i += 1
    atomic_save({'format': CKPT_FORMAT, 'i': i, 'x': torch.full((4_000_000,), float(i))}, sys.argv[1])  # 16 MB each
'''

def test_kill_9_while_saving_keeps_the_previous_checkpoint(tmp_path):
    "SIGKILL in the middle of a checkpoint write: the file under the checkpoint's name is the previous, complete one."
    ck, script = tmp_path/'checkpoint.pt', tmp_path/'keep_saving.py'
    script.write_text(KEEP_SAVING)
    for attempt in range(5):
        p = subprocess.Popen([sys.executable, script, ck], env=env(), stderr=subprocess.PIPE, text=True)
        t0, tmp = time.time(), []
        while time.time() - t0 < 120 and p.poll() is None:       # wait for one complete save, then for the next one half written
            tmp = [f for f in tmp_path.glob('.checkpoint.pt.*.tmp') if f.stat().st_size > 1_000_000]
            if ck.exists() and tmp: break
            time.sleep(0.002)
        p.kill(); p.wait()
        assert p.returncode == -signal.SIGKILL, p.stderr.read()[-2000:]
        if any(f.exists() for f in tmp): break                    # killed mid-write: its temporary file is still there
    else: pytest.fail('never caught a write in progress')
    c = read_checkpoint(ck)                                        # loadable, complete, one version throughout
    assert c['x'].numel() == 4_000_000 and torch.equal(c['x'], torch.full((4_000_000,), float(c['i'])))
    acquire_run_lock(tmp_path)                                     # a new run in the folder clears the debris
    assert sorted(f.name for f in tmp_path.iterdir()) == [LOCK_NAME, 'checkpoint.pt', 'keep_saving.py']
    release_run_lock(tmp_path)

def test_full_disk_is_one_line_and_keeps_the_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    "ENOSPC while saving epoch 2's checkpoint: exit 1, one line naming the file, epoch 1's checkpoint intact, no debris."
    out = tmp_path/'run'
    real_save, calls = torch.save, []
    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) < 2: return real_save(obj, f, *a, **k)
        f.write(b'the first bytes of a checkpoint'); raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, 'save', save)
    assert pix2pix_train(train_args(tiny, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'pix2pix_train: error: cannot write checkpoint {out/"checkpoint.pt"}: No space left on device; the previous checkpoint {out/"checkpoint.pt"} is kept'], err
    assert read_checkpoint(out/'checkpoint.pt')['epoch'] == 1
    assert not list(out.glob('.*.tmp')) and not (out/'generator.safetensors').exists()

def _contend(folder, barrier, q):
    barrier.wait()
    try: acquire_run_lock(folder); q.put(('won', os.getpid())); time.sleep(2.0); release_run_lock(folder)
    except RunLockedError as e: q.put(('refused', str(e)))
    except BaseException as e: q.put(('crashed', repr(e)))

def test_stale_lock_taken_over_by_exactly_one(tmp_path):
    "A crashed run's lock (dead pid, this host) is stale; four runs starting together: one takes it, three are refused."
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    (tmp_path/LOCK_NAME).write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname(), start='1', time=time.time())))
    ctx = multiprocessing.get_context('fork')
    barrier, q = ctx.Barrier(4), ctx.Queue()
    ps = [ctx.Process(target=_contend, args=(tmp_path, barrier, q)) for _ in range(4)]
    for p in ps: p.start()
    res = [q.get(timeout=60) for _ in ps]
    for p in ps: p.join(60)
    won = [r for r in res if r[0] == 'won']
    assert len(won) == 1, res
    assert all('is in use by another run' in r[1] and f'pid {won[0][1]}' in r[1] for r in res if r[0] == 'refused'), res
    assert not (tmp_path/LOCK_NAME).exists()

def test_lock_of_another_host_or_recycled_pid(tmp_path):
    "A lock from another host cannot be checked: refused, naming the host. A live pid with another start time is a recycled pid: stale."
    lock = tmp_path/LOCK_NAME
    lock.write_text(json.dumps(dict(pid=1, host='elsewhere', time=0)))
    with pytest.raises(RunLockedError, match=f'pid 1 on host elsewhere.*delete {lock}'): acquire_run_lock(tmp_path)
    with pytest.raises(RunLockedError): check_run_lock(tmp_path)
    lock.write_text(json.dumps(dict(pid=os.getppid(), host=socket.gethostname(), start='not-its-start-time', time=0)))
    assert acquire_run_lock(tmp_path) == lock and json.loads(lock.read_text())['pid'] == os.getpid()
    release_run_lock(tmp_path); assert not lock.exists()
    lock.write_text('garbage'); os.utime(lock, (0, 0))               # unreadable and old: a crash while it was written
    acquire_run_lock(tmp_path); release_run_lock(tmp_path)

def zeros_png(fn, w, h, k=500):
    "A real w x h greyscale PNG of zeros: 1.7 MB on disk for 20000 x 20000, 400 MB once decoded (1.2 GB as RGB)."
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    c, row = zlib.compressobj(1), bytes(w + 1)
    data = b''.join([c.compress(row * k) for _ in range(h // k)] + [c.compress(row * (h % k)), c.flush()])
    fn.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0)) + chunk(b'IDAT', data) + chunk(b'IEND', b''))
    return fn

HOSTILE = '''
import sys, json, resource
from pathlib import Path
import torch
from PIL import Image
from pix2pix_nb.data import load_rgb, image_size, DataError
from pix2pix_nb.generator import UnetGenerator
from pix2pix_nb.inference import colorize_files
d = Path(sys.argv[1])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # MB (Linux: kB)
G = UnetGenerator(ngf=4, size=32).eval()
colorize_files(G, [d/'ok1.png'], d/'warmup', progress=False, log=lambda s: None)
base, res = rss(), {}
for f in ('huge.png', 'warn.png', 'zero.png'):
    for fn in (load_rgb, image_size):
        try: fn(d/f); res[f + fn.__name__] = 'read'
        except DataError as e: res[f + fn.__name__] = str(e)
logs = []
w, s, bad = colorize_files(G, [d/'ok1.png', d/'huge.png', d/'warn.png', d/'zero.png', d/'ok2.png'], d/'out', progress=False, log=logs.append)
res.update(written=[p.name for p in w], failed=[p.name for p in bad], logs=logs, grew_mb=rss() - base)
print(json.dumps(res))
'''

def test_hostile_images_refused_without_decoding(tmp_path):
    "A 20000x20000 PNG, one in PIL's warning zone, a zero-height one: one-line DataErrors naming the file, memory flat, the batch goes on."
    zeros_png(tmp_path/'huge.png', 20000, 20000)                   # 400 Mpx: above twice PIL's limit (DecompressionBombError)
    zeros_png(tmp_path/'warn.png', 10000, 9500)                    # 95 Mpx: PIL would only warn and decode 285 MB of RGB
    zeros_png(tmp_path/'zero.png', 5, 0)                           # a well-formed header with height 0
    for i in (1, 2): Image.new('L', (40, 30), 255).save(tmp_path/f'ok{i}.png')
    (tmp_path/'hostile.py').write_text(HOSTILE)
    r = subprocess.run([sys.executable, tmp_path/'hostile.py', tmp_path], capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for f in ('huge.png', 'warn.png', 'zero.png'):
        for fn in ('load_rgb', 'image_size'):
            msg = res[f + fn]
            assert str(tmp_path/f) in msg and '\n' not in msg, (f, fn, msg)
    assert 'is 400.0 Mpx, above the 89.5 Mpx limit' in res['huge.pngload_rgb']
    assert 'is 10000x9500 = 95.0 Mpx, above the 89.5 Mpx limit' in res['warn.pngimage_size']
    assert res['written'] == ['ok1.png', 'ok2.png'] and res['failed'] == ['huge.png', 'warn.png', 'zero.png']
    assert len(res['logs']) == 3 and all(l.startswith('skipped ') for l in res['logs'])
    assert res['grew_mb'] < 100, res['grew_mb']                    # nothing was decoded (decoding huge.png alone: 400+ MB)
