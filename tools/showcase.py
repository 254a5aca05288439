"""The real-facades showcase: train the CPU recipe on label sketches of the CMP facades, then measure and draw it.

    python tools/showcase.py [--out runs/showcase] [--preset facades-cpu] [--epochs 50] [--images nbs/images]

Needs a local copy of the facades (`PIX2PIX_DATA`, as `make showcase` sets it, or `get_facades()`). Trains
pix2pix (L1 + cGAN) with the preset, and the same generator with L1 alone for the same epochs (the regression
baseline); then scores both on the held-out split against the mean-colour predictor and the untrained
generator (per-image L1, PSNR, SSIM, and the sliced Wasserstein distance of the set to the real photos), and writes small JPEG sheets to --images:
`showcase_progression.jpg` (sketch | truth | epochs 5, 10, 20, 30, 40, 49) and `showcase_test.jpg`
(sketch | pix2pix | L1 alone | truth, 12 held-out facades), plus `showcase.json` with the numbers and wall times.
Run it alone on the machine: the wall times are part of the result.
"""
import argparse, json, time, os, sys
from pathlib import Path
import torch
from PIL import Image
from fastai.callback.progress import ProgressCallback
from fastcore.basics import noop
from pix2pix_nb.core import tile
from pix2pix_nb.data import pix2pix_dls, pair_dl, facades_sketch_path
from pix2pix_nb.gan import pix2pix_nets, l1_learner, LinearDecayLR, progression_sheet
from pix2pix_nb.metrics import eval_pairs, mean_target, generator_predictor, sliced_wasserstein
from pix2pix_nb.train import fit, PRESETS
from fastai.torch_core import set_seed

def main(a):
    cfg = dict(PRESETS[a.preset]); cfg['epochs'] = a.epochs or cfg['epochs']
    if a.epochs: cfg['epochs_decay'] = round(a.epochs * PRESETS[a.preset]['epochs_decay'] / PRESETS[a.preset]['epochs'])
    out, images = Path(a.out), Path(a.images); images.mkdir(parents=True, exist_ok=True)
    src = facades_sketch_path(cfg['size'])
    t0 = time.time()
    learn = fit(**{**cfg, 'source': src}, out=out/'pix2pix', progress=False, save_every=10, n_grid=6)
    t_gan = time.time() - t0
    # the regression baseline: the same generator, initialisation, data and schedule, L1 alone
    t0 = time.time()
    dls = pix2pix_dls(src, size=cfg['size'], bs=cfg['bs'], num_workers=cfg.get('num_workers'), seed=0)
    G1, _ = pix2pix_nets(cfg['size'], cfg['ngf'], cfg['ndf'], cfg['n_layers'], seed=0, upsample=cfg.get('upsample', 'transpose'))
    l1 = l1_learner(dls, G1, lr=cfg['lr']); l1.remove_cb(ProgressCallback); l1.logger = noop
    set_seed(0); l1.fit(cfg['epochs'], lr=cfg['lr'], cbs=LinearDecayLR(cfg['lr'], cfg['epochs'] - cfg['epochs_decay'], cfg['epochs_decay']))
    t_l1 = time.time() - t0
    val = pair_dl(src, 'val', size=cfg['size'], bs=8, num_workers=0)
    mean = mean_target(pair_dl(src, 'train', size=cfg['size'], bs=16, num_workers=0))
    G0, _ = pix2pix_nets(cfg['size'], cfg['ngf'], cfg['ndf'], cfg['n_layers'], seed=1, upsample=cfg.get('upsample', 'transpose'))
    ev = lambda predict: eval_pairs(predict, val, swd=True)
    res = {'pix2pix (L1 + cGAN)': ev(generator_predictor(learn.model.G)),
           'L1 alone': ev(generator_predictor(G1)),
           'mean colour': ev(lambda A: mean.to(A.device).expand(len(A), -1, -1, -1)),
           'untrained': ev(generator_predictor(G0))}
    # the realism floor: as many *training* photos against the held-out photos (two samples of real facades)
    real_val = torch.cat([B.as_subclass(torch.Tensor) for _, B in val])
    real_train = torch.cat([B.as_subclass(torch.Tensor) for _, B in pair_dl(src, 'train', size=cfg['size'], bs=len(real_val), num_workers=0)][:1])
    res['real photos (other facades)'] = dict(swd=sliced_wasserstein(real_train, real_val)['swd'], n=len(real_val))
    # sheets
    eps = [e for e in (5, 10, 20, 30, 40, 49) if e < cfg['epochs']]
    prog = progression_sheet(out/'pix2pix', epochs=eps, fname='progression_showcase.png')
    Image.open(prog).convert('RGB').save(images/'showcase_progression.jpg', quality=85)
    A, B = next(iter(pair_dl(src, 'val', size=cfg['size'], bs=12, num_workers=0)))
    A, B = A.as_subclass(torch.Tensor), B.as_subclass(torch.Tensor)
    P, P1 = generator_predictor(learn.model.G)(A).cpu(), generator_predictor(G1)(A).cpu()
    tile([A, P, P1, B], size=cfg['size'], pad=2).save(images/'showcase_test.jpg', quality=85)
    info = dict(preset=a.preset, config=cfg, source=str(src), n_train=len(dls.train_ds), n_val=res['mean colour']['n'],
                wall_time_s={'pix2pix': round(t_gan), 'L1 alone': round(t_l1)}, torch_threads=torch.get_num_threads(),
                held_out=res, test_sheet_columns='sketch | pix2pix | L1 alone | truth')
    (images/'showcase.json').write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs/showcase'); p.add_argument('--preset', default='facades-cpu')
    p.add_argument('--epochs', type=int, default=None); p.add_argument('--images', default='nbs/images')
    main(p.parse_args())
