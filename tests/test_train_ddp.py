"""Data-parallel training under torchrun, 2 CPU processes (gloo): two ranks with batch b train like one process with
batch 2b, end identical, resume across world sizes, stop together on Ctrl-C / NaN; the console script under torchrun;
one-line launch errors. The two-process runs share one torchrun launch: this file is also the worker script."""
import os, sys, json, signal, subprocess
from pathlib import Path
from types import SimpleNamespace
import pytest, torch, torch.nn as nn
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import set_seed
from pix2pix_nb.data import synthetic_facades, pix2pix_dls
from pix2pix_nb.core import inference_mode, is_main_process
from pix2pix_nb.gan import pix2pix_learner
from pix2pix_nb.callbacks import Checkpoint, NanGuard, NonFiniteLossError, read_checkpoint, precision_callbacks
from pix2pix_nb.distributed import ddp_setup, ddp_cleanup, shard_dl, DistributedGAN

TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID')
SEED = 7 # DistributedGAN's shuffle seed in these runs

def torchrun(*args, timeout=240):
    "`torchrun --standalone --nproc_per_node 2 *args`, one thread per process."
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | dict(OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)

class PlainG(nn.Module):
    "No BatchNorm and no dropout: splitting a batch over ranks then gives exactly the whole batch's gradient."
    def __init__(self, nf=8):
        super().__init__(); self.net = nn.Sequential(nn.Conv2d(3, nf, 3, 1, 1), nn.ReLU(), nn.Conv2d(nf, 3, 3, 1, 1), nn.Tanh())
    def forward(self, x): return self.net(x)

class PlainD(nn.Module):
    def __init__(self, nf=8):
        super().__init__(); self.net = nn.Sequential(nn.Conv2d(6, nf, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(nf, 1, 3, 1, 1))
    def forward(self, x): return self.net(x)

def quiet(learn): learn.remove_cb(ProgressCallback); learn.logger = lambda *a: None; return learn

def plain_learner(data, bs, init_seed, cbs=()):
    "pix2pix with PlainG/PlainD initialised from `init_seed`, on `data` without random jitter (load_size=size, no flips)."
    torch.manual_seed(init_seed); G, D = PlainG(), PlainD()
    dls = pix2pix_dls(data, size=32, load_size=32, flip=False, bs=bs, num_workers=0)
    return quiet(pix2pix_learner(dls, G, D, cbs=list(cbs)))

class SamplerOrder(Callback):
    "One process visiting the pairs in the order of two ranks' shards interleaved: the sampler's permutation for 1 replica."
    def before_fit(self):
        self.sampler = DistributedSampler(range(len(self.dls.train.dataset)), num_replicas=1, rank=0, seed=SEED)
        self.dl = shard_dl(self.dls.train, self.sampler)
    def before_train(self):
        self.sampler.set_epoch(getattr(self.learn, 'epoch_offset', 0) + self.epoch); self.learn.dl = self.dl

class StopAfterFirstEpoch(Callback):
    order = 99 # after Checkpoint saved the epoch
    def after_epoch(self):
        if self.epoch == 0: raise CancelFitException

class Spy(Callback):
    order = 99
    def before_fit(self): self.shards, self.sums = [], []
    def before_train(self): self.shards.append(list(self.learn.dl.get_idxs()))
    def after_batch(self):
        if self.training: self.sums.append(float(self.xb[0].sum()))
    def after_train(self): self.iters = self.learn.n_iter

class Rank0Forward(Callback):
    "What the epoch grids do: rank 0 alone runs the generator after every epoch (a DDP forward that communicated would hang)."
    def before_fit(self): self.A, self.n = self.dls.valid.one_batch()[0], 0
    def after_epoch(self):
        if not is_main_process(): return
        with inference_mode(self.learn.model) as m: m(self.A)
        self.n += 1

class NanOnRank1(Callback):
    order = NanGuard.order - 1 # after the trainer recorded the losses, before the guard looks
    def after_batch(self):
        if self.training and dist.get_rank() == 1 and self.iter == 1: self.learn.trainer.last_losses['G_L1'] = float('nan')

class CtrlCOnRank1(Callback):
    "Ctrl-C in rank 1 during its first batch; counts the batches trained on every rank."
    order = Checkpoint.order - 1 # the handler has run when Checkpoint asks every rank
    def before_fit(self): self.n = 0
    def after_batch(self):
        if not self.training: return
        self.n += 1
        if dist.get_rank() == 1 and self.iter == 0: os.kill(os.getpid(), signal.SIGINT)

def state(learn):
    return {f'{n}.{k}': v.detach().clone() for n, m in learn.trainer.nets.items() for k, v in getattr(m, 'module', m).state_dict().items()}

def worker(data, out):
    "What each of the two processes runs under torchrun: several short runs, results saved per rank in `out`."
    from test_train import TinyG, TinyD
    out = Path(out); rank, world = ddp_setup(); res = {}
    def save(name, learn, **kw): torch.save(state(learn), out/f'{name}.rank{rank}.pt'); res[name] = kw
    nets = lambda learn: [type(m).__name__ for m in learn.model.children()]
    # 1. batch 2 per rank, each rank initialised differently (DDP starts both from rank 0's weights)
    learn = plain_learner(data, 2, init_seed=rank, cbs=[DistributedGAN(seed=SEED)])
    learn.fit_linear_decay(1, 1); save('equiv', learn, nets=nets(learn))
    # 2. the same, stopped after epoch 1 of 2: a checkpoint for a 1-process resume
    learn = plain_learner(data, 2, init_seed=rank, cbs=[DistributedGAN(seed=SEED), Checkpoint(out/'ddp_ck.pt'), StopAfterFirstEpoch()])
    learn.fit_linear_decay(1, 1)
    # 3. resume under DDP from the 1-process run's checkpoint
    learn = plain_learner(data, 2, init_seed=rank + 10, cbs=[DistributedGAN(seed=SEED)])
    learn.fit_linear_decay(1, 1, resume=out/'plain_ck.pt'); save('resumed', learn)
    # 4. BatchNorm, dropout and random jitter, a different seed on each rank; the generator run by rank 0 alone after each epoch
    set_seed(100 + rank); spy, fwd = Spy(), Rank0Forward()
    learn = quiet(pix2pix_learner(pix2pix_dls(data, size=32, bs=2, num_workers=0), TinyG(), TinyD(),
                                  cbs=[NanGuard(), DistributedGAN(), Checkpoint(out/'bn_ck.pt'), fwd, spy]))
    learn.fit_linear_decay(2, 1); save('bn', learn, shards=spy.shards, sums=spy.sums, n_iter=spy.iters, rank0_forwards=fwd.n)
    # 5. a NaN loss on rank 1 at batch 1 (in bf16 + channels_last, what precision='auto' picks on AMX CPUs); 6. Ctrl-C on rank 1 at batch 0
    learn = plain_learner(data, 2, init_seed=0, cbs=[NanGuard(), DistributedGAN(), NanOnRank1(), *precision_callbacks('bf16', True)])
    try: learn.fit_linear_decay(1, 1); res['nan'] = None
    except NonFiniteLossError as e: res['nan'] = dict(error=str(e), nets=nets(learn))
    ctrl_c = CtrlCOnRank1()
    learn = plain_learner(data, 2, init_seed=0, cbs=[DistributedGAN(), Checkpoint(out/'int_ck.pt'), ctrl_c])
    learn.fit_linear_decay(1, 1); res['ctrl_c'] = dict(interrupted=learn.interrupted, batches=ctrl_c.n, nets=nets(learn))
    (out/f'res.rank{rank}.json').write_text(json.dumps(res))
    ddp_cleanup()

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "One process with batch 4 in the shards' order (a full run, and one stopped after epoch 1), then the 2-process worker."
    tmp = tmp_path_factory.mktemp('ddp')
    data = synthetic_facades(tmp/'data', n_train=8, n_val=2, n_test=1, size=32)
    ref = plain_learner(data, 4, init_seed=0, cbs=[SamplerOrder()]); w0 = state(ref)
    ref.fit_linear_decay(1, 1)
    plain_learner(data, 4, init_seed=0, cbs=[SamplerOrder(), Checkpoint(tmp/'plain_ck.pt'), StopAfterFirstEpoch()]).fit_linear_decay(1, 1)
    r = torchrun(__file__, data, tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    load = lambda name: [torch.load(tmp/f'{name}.rank{i}.pt', weights_only=True) for i in (0, 1)]
    res = [json.loads((tmp/f'res.rank{i}.json').read_text()) for i in (0, 1)]
    return SimpleNamespace(tmp=tmp, data=data, w0=w0, ref=state(ref), load=load, res=res)

def close(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    bad = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=tol)}
    assert not bad, bad

def test_two_ranks_train_like_one_process_with_double_batch(runs):
    s0, s1 = runs.load('equiv')
    assert all(torch.equal(s0[k], s1[k]) for k in s0)                    # both ranks identical
    close(s0, runs.ref)                                                   # = 1 process, batch 4, same order
    assert not all(torch.allclose(runs.w0[k], runs.ref[k]) for k in runs.w0)   # (and training moved the weights)
    assert runs.res[0]['equiv']['nets'] == ['PlainG', 'PlainD']          # DDP wrappers removed after the fit

def test_checkpoints_resume_across_world_sizes(runs):
    ck = read_checkpoint(runs.tmp/'ddp_ck.pt')
    assert ck['epoch'] == 1 and not any('module' in k for sd in ck['nets'].values() for k in sd)
    one = plain_learner(runs.data, 4, init_seed=3, cbs=[SamplerOrder()])  # 2-process checkpoint, finished in 1 process
    one.fit_linear_decay(1, 1, resume=runs.tmp/'ddp_ck.pt')
    close(state(one), runs.ref)
    s0, s1 = runs.load('resumed')                                         # 1-process checkpoint, finished in 2 processes
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    close(s0, runs.ref)

def test_ranks_identical_with_batchnorm_dropout_and_jitter(runs):
    s0, s1 = runs.load('bn')
    diff = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not diff, f'ranks differ in {diff}'                            # weights and BatchNorm buffers
    r0, r1 = runs.res[0]['bn'], runs.res[1]['bn']
    assert len(r0['shards']) == 3 and r0['n_iter'] == 2                   # 8 pairs / 2 ranks / bs 2
    for a, b in zip(r0['shards'], r1['shards']):
        assert len(a) == len(b) == 4 and sorted(a + b) == list(range(8))  # disjoint shards covering the data
    assert r0['shards'][0] != r0['shards'][1]                              # reshuffled every epoch
    assert r0['sums'] != r1['sums']                                        # the ranks really saw different batches
    assert read_checkpoint(runs.tmp/'bn_ck.pt')['epoch'] == 3
    assert (r0['rank0_forwards'], r1['rank0_forwards']) == (3, 0)

def test_nan_or_ctrl_c_on_one_rank_stops_every_rank_after_the_same_batch(runs):
    n0, n1 = runs.res[0]['nan'], runs.res[1]['nan']
    assert n0 and n1, 'both ranks must raise NonFiniteLossError'
    assert 'loss on another rank=nan' in n0['error'] and 'G_L1=nan' in n1['error']
    assert all('epoch 0, batch 1' in n['error'] for n in (n0, n1))
    assert n0['nets'] == ['PlainG', 'PlainD']                              # unwrapped by `cleanup` when fit raised
    c0, c1 = runs.res[0]['ctrl_c'], runs.res[1]['ctrl_c']
    assert c0 == c1 and c0['interrupted'] and c0['batches'] == 1
    ck = read_checkpoint(runs.tmp/'int_ck.pt')
    assert (ck['epoch'], ck['batch']) == (0, 1)

def test_console_script_under_torchrun(tmp_path):
    "The done-when command: `torchrun --nproc_per_node 2 --standalone $(which pix2pix_train) ...` (synthetic data at 32 px)."
    from pix2pix_nb.synthetic import synthetic_path
    synthetic_path(size=32)  # make the cached set once here, not in both ranks at once
    exe = Path(sys.executable).parent/'pix2pix_train'
    out = tmp_path/'run'
    r = torchrun(exe, '--source', 'synthetic', '--size', 32, '--epochs', 1, '--ngf', 8, '--ndf', 8, '--n_layers', 2, '--bs', 2,
                 '--num_workers', 0, '--out', out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob('*.pt')) == ['checkpoint.pt'] and read_checkpoint(out/'checkpoint.pt')['epoch'] == 1
    assert sorted(p.name for p in out.glob('*.safetensors')) == ['generator.safetensors']
    assert json.loads((out/'config.json').read_text())['world_size'] == 2
    assert not [p for p in out.iterdir() if '.tmp' in p.name or p.name.startswith('.')]

@pytest.mark.parametrize('prog', ['pix2pix_train', 'pix2pix_cyclegan'])
def test_wrong_launch_is_a_one_line_error(prog, monkeypatch, capsys, tmp_path):
    "WORLD_SIZE without the rest of torchrun's environment: `prog: error: ...` on one line, exit status 2."
    from pix2pix_nb import cli
    for k in TORCHRUN_ENV: monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert getattr(cli, prog)(['--out', str(tmp_path/'run')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'{prog}: error: distributed training needs RANK, MASTER_ADDR, MASTER_PORT') and err.count('\n') == 1, err
    assert 'torchrun' in err and not (tmp_path/'run').exists()

@pytest.mark.slow
def test_ddp_benchmark_smoke(tmp_path):
    "benchmarks/ddp.py --smoke (tiny nets, two timed steps, six launches: about a minute): the harness runs and writes its block."
    md = tmp_path/'B.md'; md.write_text('# Intro\n')
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1]/'benchmarks'/'ddp.py'), '--smoke', '--md', md],
                       capture_output=True, text=True, timeout=600, env={k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV})
    assert r.returncode == 0, r.stderr[-3000:]
    text = md.read_text()
    assert text.startswith('# Intro') and '## Data-parallel training (DDP)' in text and 'exposed communication' in text
    res = json.loads((tmp_path/'ddp.json').read_text())['results']
    assert len(res) == 6 and all(v['step_s'] > 0 for v in res.values())
    timed = res['2 processes (DDP), all-reduces timed']
    assert timed['buckets'] >= 2 and timed['comm_s'] > 0

if __name__ == '__main__': worker(*sys.argv[1:])
