"""pix2pix_nb.train: exact resume, Ctrl-C, NaN guard, checkpoint atomicity and safe loading (tiny nets, CPU)."""
import os, signal, pickle
from pathlib import Path
import pytest, torch, torch.nn as nn
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import set_seed
from pix2pix_nb.data import synthetic_facades, pix2pix_dls
from pix2pix_nb.train import (pix2pix_learner, Checkpoint, NanGuard, EpochGrid, NonFiniteLossError, CheckpointError,
                              read_checkpoint, load_checkpoint, save_checkpoint, atomic_save, CKPT_FORMAT)

class TinyG(nn.Module):
    "3x3 conv net with BatchNorm and dropout (the two stateful/random parts of the real U-Net)."
    def __init__(self, nf=8):
        super().__init__(); self.hparams = dict(nf=nf)
        self.net = nn.Sequential(nn.Conv2d(3, nf, 3, 1, 1), nn.BatchNorm2d(nf), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(nf, 3, 3, 1, 1), nn.Tanh())
    def forward(self, x): return self.net(x)

class TinyD(nn.Module):
    def __init__(self, nf=8):
        super().__init__(); self.hparams = dict(nf=nf)
        self.net = nn.Sequential(nn.Conv2d(6, nf, 4, 2, 1), nn.BatchNorm2d(nf), nn.LeakyReLU(0.2), nn.Conv2d(nf, 1, 3, 1, 1))
    def forward(self, x): return self.net(x)

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return synthetic_facades(tmp_path_factory.mktemp('synth'), n_train=8, n_val=4, n_test=2, size=32)

def make(data, ck, seed=0, extra=()):
    set_seed(seed)
    dls = pix2pix_dls(data, size=32, bs=2, num_workers=0)
    learn = pix2pix_learner(dls, TinyG(), TinyD(), cbs=[NanGuard(), Checkpoint(ck, every=1),
                            EpochGrid(2, Path(ck).parent/'grids', widget=False, size=32), *extra])
    learn.remove_cb(ProgressCallback)
    return learn

def state(learn): return {f'{n}.{k}': v.clone() for n, m in learn.trainer.nets.items() for k, v in m.state_dict().items()}

class StopAfterEpoch(Callback):
    order = 99 # after Checkpoint
    def __init__(self, epoch): self.stop = epoch
    def after_epoch(self):
        if self.epoch == self.stop: raise CancelFitException

def test_resume_is_exact(data, tmp_path):
    full = make(data, tmp_path/'a'/'ck.pt'); w0 = state(full)
    full.fit_linear_decay(2, 2)
    part = make(data, tmp_path/'b'/'ck.pt', extra=[StopAfterEpoch(1)]); part.fit_linear_decay(2, 2)
    assert read_checkpoint(tmp_path/'b'/'ck.pt')['epoch'] == 2
    res = make(data, tmp_path/'b'/'ck.pt', seed=123)  # different seed: everything must come from the checkpoint
    res.fit_linear_decay(2, 2, resume=tmp_path/'b'/'ck.pt')
    a, b, p = state(full), state(res), state(part)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert not all(torch.equal(a[k], w0[k]) for k in a) and not all(torch.equal(a[k], p[k]) for k in a)
    assert len(res.recorder.values) == 2 and read_checkpoint(tmp_path/'b'/'ck.pt')['epoch'] == 4
    assert sorted(f.name for f in (tmp_path/'b'/'grids').glob('epoch_*.png')) == [f'epoch_{i:03d}.png' for i in range(4)]
    assert (tmp_path/'b'/'grids'/'progression.png').is_file()
    opts = read_checkpoint(tmp_path/'b'/'ck.pt')['opts']
    assert set(opts) == {'G', 'D'} and opts['G']['param_groups'][0]['lr'] < 1e-4 # decayed

class SignalAt(Callback):
    "Send `sig` to this process after batch `it` of epoch `epoch` (of training, or of validation when `training=False`)."
    def __init__(self, epoch, it, sig=signal.SIGINT, training=True): self.at, self.sig, self.tr = (epoch, it), sig, training
    def after_batch(self):
        if self.training == self.tr and (self.epoch, self.iter) == self.at: os.kill(os.getpid(), self.sig)

@pytest.fixture
def sigint_handled():
    "SIGINT with a normal handler for the test (under `nohup`/`make test &` it is ignored, and Checkpoint rightly leaves it so); the old one after."
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN: signal.signal(signal.SIGINT, signal.default_int_handler)
    yield signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, before)

@pytest.mark.parametrize('sig, at, training, saved', [
    (signal.SIGINT, (1, 1), True, (1, 2)),    # Ctrl-C after batch 1 of epoch 1: mid-epoch checkpoint
    (signal.SIGTERM, (0, 0), True, (0, 1)),   # SIGTERM (preemption) after the first batch of the run
    (signal.SIGTERM, (1, 3), True, (1, 4)),   # ... after the last batch of an epoch, before its validation
    (signal.SIGINT, (0, 0), False, (1, 0)),   # during validation: stops at the epoch boundary
])
def test_signal_saves_and_resume_is_exact(data, tmp_path, capsys, sigint_handled, sig, at, training, saved):
    "Ctrl-C / SIGTERM: finish the batch, save with the position, stop; the resumed run ends bit-identical to an uninterrupted one."
    full = make(data, tmp_path/'full'/'ck.pt'); full.fit_linear_decay(2, 1)
    term = signal.getsignal(signal.SIGTERM)
    ck = tmp_path/'ck.pt'
    learn = make(data, ck, extra=[SignalAt(*at, sig=sig, training=training)]); learn.fit_linear_decay(2, 1)
    assert learn.interrupted and learn.stop_signal == sig
    assert ('Ctrl-C' if sig == signal.SIGINT else 'SIGTERM') in capsys.readouterr().out
    c = read_checkpoint(ck); assert (c['epoch'], c['batch']) == saved and ('epoch_rng' in c) == (saved[1] > 0)
    assert signal.getsignal(signal.SIGINT) is sigint_handled and signal.getsignal(signal.SIGTERM) is term # exactly the old handlers
    res = make(data, ck, seed=123); res.fit_linear_decay(2, 1, resume=ck)   # another seed: everything comes from the checkpoint
    assert not res.interrupted and read_checkpoint(ck)['epoch'] == 3 and len(res.recorder.values) == 3 - saved[0]
    a, b = state(full), state(res)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []

def test_mid_epoch_resume_needs_the_epoch_start_state(data, tmp_path, sigint_handled):
    "The exactness test can fail: without the epoch's start state (an older checkpoint) the rest of the epoch is reshuffled."
    full = make(data, tmp_path/'full'/'ck.pt'); full.fit_linear_decay(2, 1)
    ck = tmp_path/'ck.pt'
    make(data, ck, extra=[SignalAt(1, 1)]).fit_linear_decay(2, 1)
    c = read_checkpoint(ck); del c['epoch_rng']; atomic_save(c, ck)
    res = make(data, ck)
    with pytest.warns(UserWarning, match='not bit-exact'): res.fit_linear_decay(2, 1, resume=ck)
    a, b = state(full), state(res)
    assert any(not torch.equal(a[k], b[k]) for k in a)

def test_ignored_signals_stay_ignored(data, tmp_path):
    "Under nohup / `cmd &` SIGINT is ignored on purpose: Checkpoint does not catch it during fit and leaves it ignored after."
    seen = []
    spy = type('Spy', (Callback,), dict(after_batch=lambda self: seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))))()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        learn = make(data, tmp_path/'ck.pt', extra=[spy]); learn.fit_linear_decay(1)
        assert seen and all(i is signal.SIG_IGN for i, _ in seen)                    # not caught during fit
        assert all(getattr(t, '__func__', None) is Checkpoint._on_signal for _, t in seen) # SIGTERM (not ignored) is
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
    finally:
        for s, h in before.items(): signal.signal(s, h)

class PoisonG(Callback):
    def before_batch(self):
        if self.training and self.epoch == 1 and self.iter == 1:
            with torch.no_grad():
                for p in self.learn.model.G.parameters(): p.fill_(float('nan'))

def test_nan_guard_stops_and_keeps_last_good(data, tmp_path):
    ck = tmp_path/'ck.pt'
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    learn = make(data, ck, extra=[PoisonG()])
    with pytest.raises(NonFiniteLossError, match=r'non-finite loss .* at epoch 1, batch 1.*last good checkpoint kept'):
        learn.fit_linear_decay(3)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before # restored although fit raised
    c = read_checkpoint(ck)
    assert c['epoch'] == 1 and all(torch.isfinite(v).all() for v in c['nets']['G'].values() if v.is_floating_point())

def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = atomic_save({'format': CKPT_FORMAT, 'x': torch.ones(3)}, tmp_path/'ck.pt'); before = p.read_bytes()
    def broken_save(obj, f): f.write(b'partial'); raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'): atomic_save({'x': torch.zeros(3)}, p)
    assert p.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ['ck.pt']

class Evil:
    def __reduce__(self): return (os.system, ('echo pwned',))

def test_loading_never_unpickles_objects(tmp_path, data):
    bad = tmp_path/'evil.pt'; torch.save({'format': CKPT_FORMAT, 'x': Evil()}, bad)
    with pytest.raises(CheckpointError, match='cannot read checkpoint'): read_checkpoint(bad)
    (tmp_path/'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='junk.pt'): read_checkpoint(tmp_path/'junk.pt')
    torch.save({'a': torch.ones(1)}, tmp_path/'other.pt')
    with pytest.raises(CheckpointError, match='not a pix2pix_nb checkpoint'): read_checkpoint(tmp_path/'other.pt')
    with pytest.raises(CheckpointError, match='not found'): read_checkpoint(tmp_path/'missing.pt')
    learn = make(data, tmp_path/'ck.pt'); learn.create_opt(); save_checkpoint(learn, tmp_path/'ck.pt', 1)
    set_seed(0); other = pix2pix_learner(pix2pix_dls(data, size=32, bs=2, num_workers=0), TinyG(16), TinyD())
    with pytest.raises(CheckpointError, match="weights for 'G' do not fit"): load_checkpoint(other, tmp_path/'ck.pt')

@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_trains_and_resumes(data, tmp_path, precision):
    from pix2pix_nb.callbacks import TrainerPrecision, ChannelsLastBatches
    ck = tmp_path/'ck.pt'
    learn = make(data, ck, extra=[TrainerPrecision(precision), ChannelsLastBatches()]); w0 = state(learn)
    seen = []
    learn.add_cb(type('Spy', (Callback,), dict(after_batch=lambda self: seen.append(dict(self.learn.trainer.scalers)) if self.training else None))())
    learn.fit_linear_decay(1, 1)
    assert all(torch.isfinite(torch.tensor(v)).all() for row in learn.recorder.values for v in row)
    assert not all(torch.equal(w0[k], v) for k, v in state(learn).items())
    if precision == 'fp16': assert set(seen[0]) == {'G', 'D'} and seen[0]['G'] is not seen[0]['D']   # one GradScaler per optimiser
    else: assert seen[0] == {}
    assert learn.trainer.scalers == {} and not torch.is_autocast_enabled('cpu')   # cleaned up after fit
    c = read_checkpoint(ck); assert set(c['scalers']) == ({'G', 'D'} if precision == 'fp16' else set())

def test_atomic_save_gives_plain_permissions(tmp_path):
    old = os.umask(0o027)
    try: p = atomic_save({'format': CKPT_FORMAT, 'x': torch.ones(1)}, tmp_path/'m.pt')
    finally: os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o640

def test_auto_precision_is_resolved_and_recorded(tmp_path, data):
    "fit's default precision='auto' picks per device (bf16 + channels_last on AMX CPUs, else fp32) and says which in config.json."
    import json
    from pix2pix_nb.train import fit, resolve_precision
    learn = fit(data, epochs=1, size=32, bs=2, ngf=8, ndf=8, n_layers=2, out=tmp_path, progress=False, export=False, num_workers=0)
    cfg = json.loads((tmp_path/'config.json').read_text())
    want = resolve_precision('auto', None, 'cpu')
    assert (cfg['precision'], cfg['channels_last']) == want
    names = {type(c).__name__ for c in learn.cbs}
    assert ('TrainerPrecision' in names) == (want[0] == 'bf16') and ('ChannelsLastBatches' in names) == want[1]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in learn.recorder.values[-1][:-1])

def test_ema_resume_is_exact_and_g_becomes_the_average(data, tmp_path, sigint_handled):
    "GeneratorEMA: a run interrupted mid-epoch and resumed ends with the same average (and G = average) as an uninterrupted one."
    from pix2pix_nb.callbacks import GeneratorEMA
    full_ema = GeneratorEMA(0.9); full = make(data, tmp_path/'full'/'ck.pt', extra=[full_ema]); w0 = state(full)
    full.fit_linear_decay(2, 1)
    assert full_ema.steps == 3 * 4 and 'GeneratorEMA' in read_checkpoint(tmp_path/'full'/'ck.pt')['cbs']
    assert all(torch.equal(v, full_ema.ema.state_dict()[k]) for k, v in full.model.G.state_dict().items())   # G is the average
    ck = tmp_path/'ck.pt'
    part = make(data, ck, extra=[GeneratorEMA(0.9), SignalAt(1, 1)]); part.fit_linear_decay(2, 1)
    assert part.interrupted
    saved = read_checkpoint(ck); assert saved['cbs']['GeneratorEMA']['steps'] == 4 + 2
    res_ema = GeneratorEMA(0.9); res = make(data, ck, seed=123, extra=[res_ema]); res.fit_linear_decay(2, 1, resume=ck)
    assert res_ema.steps == full_ema.steps
    a, b = state(full), state(res)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not all(torch.equal(a[k], w0[k]) for k in a)
    # the checkpoint keeps the live weights (for exact resume), not the average
    live = read_checkpoint(ck)['nets']['G']
    assert any(not torch.equal(live[k], v) for k, v in full_ema.ema.state_dict().items() if v.is_floating_point())
