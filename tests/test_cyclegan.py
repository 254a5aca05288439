"""pix2pix_nb.cyclegan beyond the notebook: the console script (errors, a tiny real run), real-facade splits, 2-process DDP."""
import os, sys, json, signal, subprocess, shutil, warnings
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from pix2pix_nb.data import synthetic_facades, load_rgb
from pix2pix_nb.cyclegan import unpaired_split, facades_unpaired, domain_files, unpaired_dls
from pix2pix_nb.callbacks import read_checkpoint, atomic_save
from fastai.callback.core import Callback, CancelFitException

CLI = shutil.which('pix2pix_cyclegan') or str(Path(sys.executable).parent/'pix2pix_cyclegan')

def cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)

@pytest.fixture(scope='module')
def unpaired(tmp_path_factory):
    "A tiny synthetic set (32 px) split into trainA/ trainB/ halves, plus the paired set for validation."
    d = tmp_path_factory.mktemp('cg')
    paired = synthetic_facades(d/'paired', n_train=8, n_val=2, n_test=2, size=32)
    unpaired_split(paired, d/'unpaired', 'train')
    return d/'unpaired', paired

def test_cli_help():
    r = cli('--help')
    assert r.returncode == 0 and '--source_a' in r.stdout and '--lambda_idt' in r.stdout

def test_cli_bad_input_is_one_line(tmp_path, unpaired):
    "The real console script: a bad flag ends with exactly one stderr line naming it, no traceback."
    r = cli('--source_a', unpaired[0], '--precision', 'fp8', '--out', tmp_path/'run', '--size', 32, '--epochs', 1)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip() and 'Warning' not in l and 'warnings.warn' not in l]
    assert r.returncode != 0 and len(lines) == 1 and "precision='fp8'" in lines[0], r.stderr[-2000:]

@pytest.mark.parametrize('kwargs, needle', [
    (dict(source_a='/no/such/dir', source_b='/no/such/dirB'), '/no/such/dir'),
    (dict(generator='vgg'), "generator='vgg'"),
    (dict(epochs=0), 'epochs=0'),
    (dict(epochs=2, epochs_decay=3), 'epochs_decay=3'),
    (dict(facades='/no/facades'), '/no/facades'),
    (dict(facades='/no/facades', source_b='x'), '--facades replaces'),
    (dict(norm='group'), 'group'),
])
def test_cli_bad_input(tmp_path, unpaired, kwargs, needle, capsys):
    "In-process: a bad value is exit status 2 and one stderr line naming it."
    from pix2pix_nb.cli import pix2pix_cyclegan
    kw = dict(source_a=str(unpaired[0]), epochs=1, size=32, out=str(tmp_path/'run')) | kwargs
    if 'facades' in kwargs: kw['source_a'] = 'synthetic'
    argv = [a for k, v in kw.items() for a in (f'--{k}', str(v))] + ['--no_progress']
    assert pix2pix_cyclegan(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('pix2pix_cyclegan: error:') and needle in err and err.count('\n') == 1, err

def test_cli_tiny_run_and_resume(tmp_path, unpaired):
    root, paired = unpaired
    out = tmp_path/'run'
    common = ['--source_a', root, '--valid', paired, '--size', 32, '--bs', 2, '--ngf', 8, '--ndf', 8, '--n_blocks', 1,
              '--n_layers', 2, '--n_grid', 2, '--epochs', 2, '--save_every', 1, '--no_progress', '--out', out]
    r = cli(*common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'epoch 1:' in r.stdout and 'cycle_A=' in r.stdout and 'D_B=' in r.stdout
    files = {p.name for p in out.iterdir()}
    assert {'checkpoint.pt', 'config.json', 'losses.png', 'grid_A', 'grid_B', 'generator.safetensors',
            'generator_BtoA.safetensors'} <= files, files
    meta = json.loads((out/'generator.json').read_text())
    assert meta['direction'] == 'AtoB' and meta['arch'].endswith('ResnetGenerator')
    from pix2pix_nb.inference import load_generator
    G = load_generator(out/'generator.safetensors', device='cpu')
    assert G(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    r = cli(*common, '--resume', 'last')                                  # the run is complete: clear one-line refusal
    assert r.returncode != 0 and 'nothing left to train' in r.stderr

def test_unpaired_split_is_disjoint(tmp_path):
    paired = synthetic_facades(tmp_path/'p', n_train=10, n_val=1, n_test=1, size=32)
    a, b = unpaired_split(paired, tmp_path/'u', 'train', seed=3)
    fa, fb = domain_files(a), domain_files(b)
    assert len(fa) == len(fb) == 5 and not {f.name for f in fa} & {f.name for f in fb}
    a2, _ = unpaired_split(paired, tmp_path/'u2', 'train', seed=3)
    assert [f.name for f in domain_files(a2)] == [f.name for f in fa]   # the split is reproducible

def test_facades_unpaired_real(tmp_path, facades):
    root = facades_unpaired(facades, tmp_path/'fu', n=6)
    fa, fb = domain_files(root/'trainA'), domain_files(root/'trainB')
    assert len(fa) == len(fb) == 3 and not {f.stem for f in fa} & {f.stem for f in fb}
    assert set(np.unique(np.asarray(load_rgb(fa[0])))) <= {0, 255}        # binary sketches of photos
    ph = np.asarray(load_rgb(fb[0])).astype(int)
    assert np.abs(ph[..., 0] - ph[..., 2]).mean() > 1                     # colour photos
    dls = unpaired_dls(root, size=64, bs=2, n_valid=2)
    a, b = dls.one_batch()
    assert a.shape == b.shape == (2, 3, 64, 64)

WORKER = '''
import sys, json, torch
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import set_seed
from pix2pix_nb.cyclegan import unpaired_dls, cyclegan_model, cyclegan_learner
from pix2pix_nb.train import ddp_setup, ddp_cleanup, DistributedGAN, Checkpoint, NanGuard

rank, world = ddp_setup()
set_seed(100 + rank)    # different seeds on purpose: DistributedGAN must make the ranks agree
dls = unpaired_dls({root!r}, size=32, bs=2, n_valid=2)
model = cyclegan_model('resnet', ngf=8, ndf=8, n_blocks=1, n_layers=2, size=32)
learn = cyclegan_learner(dls, model, cbs=[NanGuard(), DistributedGAN(), Checkpoint({out!r} + '/ck.pt')])
learn.remove_cb(ProgressCallback)
learn.fit_linear_decay(1, 1)
sd = {{f'{{n}}.{{k}}': v for n, m in learn.trainer.nets.items() for k, v in m.state_dict().items()}}
torch.save(sd, f'{out}/rank{{rank}}.pt')
json.dump(dict(n_iter=learn.n_iter, values=[list(map(float, v)) for v in learn.recorder.values]), open(f'{out}/rank{{rank}}.json', 'w'))
ddp_cleanup()
'''

def test_two_process_gloo_ddp(tmp_path, unpaired):
    root, _ = unpaired
    script = tmp_path/'worker.py'
    script.write_text(WORKER.format(root=str(root), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = (torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in (0, 1))
    assert s0.keys() == s1.keys() and {k.split('.')[0] for k in s0} == {'G_A', 'G_B', 'D_A', 'D_B'}
    diff = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not diff, f'ranks differ in {diff}'
    j0 = json.loads((tmp_path/'rank0.json').read_text())
    assert j0['n_iter'] == 1                       # 4 A images / 2 ranks / bs 2
    assert (tmp_path/'ck.pt').is_file()

def _tiny(root, paired, out, **kw):
    from pix2pix_nb.cyclegan import fit_cyclegan
    args = dict(size=32, bs=2, ngf=8, ndf=8, n_blocks=1, n_layers=2, n_grid=2, valid=paired, epochs=1, save_every=1,
                export=False, progress=False, out=out) | kw
    return fit_cyclegan(root, **args)

def test_bf16_channels_last(tmp_path, unpaired):
    "Shared Precision and ChannelsLast callbacks work with the four-network trainer (CPU autocast in bf16)."
    learn = _tiny(*unpaired, tmp_path/'r', precision='bf16', channels_last=True)
    vals = learn.recorder.values[-1]
    assert all(np.isfinite(v) for v in vals), vals
    assert learn.model.G_A.encoder[1].weight.is_contiguous(memory_format=torch.channels_last)

def test_nan_guard_stops_with_clear_error(tmp_path, unpaired):
    from fastai.callback.core import Callback
    from pix2pix_nb.train import NonFiniteLossError
    class Poison(Callback):
        def before_batch(self):
            if self.training and self.iter == 1:
                with torch.no_grad(): next(self.learn.model.D_A.parameters()).fill_(float('nan'))
    with pytest.raises(NonFiniteLossError, match='non-finite loss'):
        _tiny(*unpaired, tmp_path/'r', cbs=Poison(), epochs=2)

class _StopAt(Callback):
    "Stop after epoch `epoch` (`it=None`; after that epoch's checkpoint), or send SIGTERM after training batch `it` of `epoch` (before the checkpoint looks)."
    def __init__(self, epoch, it=None): self.at, self.it, self.order = epoch, it, (99 if it is None else 0)
    def after_epoch(self):
        if self.it is None and self.epoch == self.at: raise CancelFitException
    def after_batch(self):
        if self.it is not None and self.training and (self.epoch, self.iter) == (self.at, self.it): os.kill(os.getpid(), signal.SIGTERM)

@pytest.fixture
def sigterm_handled():
    "SIGTERM with its default handler for the test (a runner may ignore it; Checkpoint would rightly leave it ignored)."
    before = signal.getsignal(signal.SIGTERM)
    if before is signal.SIG_IGN: signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)

def _weights(learn): return {f'{n}.{k}': v for n, m in learn.trainer.nets.items() for k, v in m.state_dict().items()}

@pytest.mark.parametrize('stop, saved, drop_pools', [
    (_StopAt(0), (1, 0), False),       # stopped after epoch 1 (by a callback, after its checkpoint)
    (_StopAt(1, 0), (1, 1), False),    # SIGTERM after the first batch of epoch 2: mid-epoch checkpoint
    (_StopAt(1, 0), (1, 1), True),     # the same without the pools in the checkpoint: the resumed run differs
])
def test_interrupted_resume_equals_uninterrupted(tmp_path, unpaired, sigterm_handled, stop, saved, drop_pools):
    "CycleGAN resumes bit for bit: weights, optimisers, RNG states and both image pools (full, so their random swaps matter)."
    kw = dict(epochs=3, epochs_decay=1, pool_size=3)                # 2 batches of 2 per epoch: the pools fill in epoch 1
    full = _tiny(*unpaired, tmp_path/'full', **kw)
    part = _tiny(*unpaired, tmp_path/'part', cbs=stop, **kw)
    path = tmp_path/'part'/'checkpoint.pt'
    ck = read_checkpoint(path)
    assert (ck['epoch'], ck['batch']) == saved and part.interrupted == (stop.it is not None)
    assert {k: len(p['images']) for k, p in ck['extra']['pools'].items()} == {'fake_A': 3, 'fake_B': 3}
    if drop_pools: del ck['extra']; atomic_save(ck, path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        res = _tiny(*unpaired, tmp_path/'part', resume=True, **kw)
    assert any('starts afresh' in str(x.message) for x in w) == drop_pools
    a, b = _weights(full), _weights(res)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert bool(diff) == drop_pools, diff
    assert read_checkpoint(path)['epoch'] == 3
