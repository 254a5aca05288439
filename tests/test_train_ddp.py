"""Data-parallel pix2pix training: 2 CPU processes under torchrun (gloo) end with identical weights, each saw its own shard."""
import os, sys, json, subprocess, textwrap
from pathlib import Path
import pytest, torch
from pix2pix_nb.data import synthetic_facades

WORKER = '''
import sys, json, torch
sys.path.insert(0, {tests!r})
from test_train import TinyG, TinyD
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import set_seed
from pix2pix_nb.data import pix2pix_dls
from pix2pix_nb.train import ddp_setup, ddp_cleanup, pix2pix_learner, DistributedGAN, Checkpoint, NanGuard

class Spy(Callback):
    order = 99
    def before_fit(self): self.shards, self.sums = [], []
    def after_batch(self):
        if self.training: self.sums.append(float(self.xb[0].sum()))
    def after_train(self): self.shards.append(list(self.learn.dl.idxs)); self.n_iter = self.learn.n_iter

rank, world = ddp_setup()
set_seed(100 + rank)    # different seeds on purpose: DistributedGAN must make the ranks agree
dls = pix2pix_dls({data!r}, size=32, bs=2, num_workers=0)
spy = Spy()
learn = pix2pix_learner(dls, TinyG(), TinyD(), cbs=[NanGuard(), DistributedGAN(), Checkpoint({out!r} + '/ck.pt'), spy])
learn.remove_cb(ProgressCallback)
learn.fit_linear_decay(2, 1)
sd = {{f'{{n}}.{{k}}': v for n, m in learn.trainer.nets.items() for k, v in m.state_dict().items()}}
torch.save(sd, f'{out}/rank{{rank}}.pt')
json.dump(dict(shards=spy.shards, sums=spy.sums, n_iter=spy.n_iter), open(f'{out}/rank{{rank}}.json', 'w'))
ddp_cleanup()
'''

def test_two_process_gloo_ddp(tmp_path):
    data = synthetic_facades(tmp_path/'data', n_train=8, n_val=2, n_test=1, size=32)
    script = tmp_path/'worker.py'
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), data=str(data), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = (torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in (0, 1))
    assert s0.keys() == s1.keys()
    diff = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not diff, f'ranks differ in {diff}'
    j0, j1 = (json.loads((tmp_path/f'rank{i}.json').read_text()) for i in (0, 1))
    assert len(j0['shards']) == 3 and j0['n_iter'] == 2                # 8 pairs / 2 ranks / bs 2
    for a, b in zip(j0['shards'], j1['shards']):
        assert not set(a) & set(b) and sorted(a + b) == list(range(8))  # disjoint shards covering the data
    assert j0['sums'] != j1['sums']                                      # and the batches really differ
    assert j0['shards'][0] != j0['shards'][1] or j1['shards'][0] != j1['shards'][1] # reshuffled each epoch
    assert (tmp_path/'ck.pt').is_file()
