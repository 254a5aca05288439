"""Colour hints on the synthetic test split: a hint-free generator against a hint generator (chapter 08).

    python tools/hints_experiment.py train free  [--out runs/hints_exp]   # the hint-free model
    python tools/hints_experiment.py train hints [--out runs/hints_exp]   # the same recipe, fit(hints=True)
    python tools/hints_experiment.py eval        [--out runs/hints_exp] [--images nbs/images]

Both models use `PRESETS['hints-cpu']` (64 px, same data, seed, nets and epochs). A `train` run stopped by SIGTERM
(e.g. `timeout -s TERM 420 ...`, to keep each hold of a shared CPU short) saves a checkpoint; the same command
continues it exactly. `eval` scores both on the 106 synthetic test facades with `image_metrics` (per-image L1 and
SSIM): the hint-free model, and the hint model given 0, 1, 5 and 20 hints simulated from the true photo (the same
hints for every run), and writes to --images: `hints_results.json`, `hints_test.jpg` (sketch | truth | hint-free |
hints, none given | the 5 hints | hints, 5 given) and `hints_three_walls.jpg` (one stucco test sketch: hint-free, then
two clicks on the wall in each of three colours, as a person would give them through `colorize`).
"""
import argparse, json, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from pix2pix_nb.core import tile, pil_to_tensor
from pix2pix_nb.data import pair_dl
from pix2pix_nb.synthetic import facade_spec, render_facade, _LBL
from pix2pix_nb.metrics import image_metrics, eval_pairs, generator_predictor
from pix2pix_nb.generator import load_generator
from pix2pix_nb.hints import HintSampler, hint_generator, show_hints, render_hints, Point
from pix2pix_nb.inference import colorize
from pix2pix_nb.train import fit, PRESETS

PRESET = 'hints-cpu'
N_HINTS = (0, 1, 5, 20)
COLORS = {'pink': (240, 160, 180), 'blue': (150, 190, 240), 'yellow': (245, 220, 110)}

def train(kind, out):
    cfg = dict(PRESETS[PRESET]); cfg['hints'] = kind == 'hints'
    run = out/kind
    if (run/'generator.safetensors').is_file(): print(f'{run}: already trained'); return
    t0 = time.time()
    learn = fit('synthetic', out=run, progress=False, save_every=1, resume=True if (run/'checkpoint.pt').is_file() else None, **cfg)
    dt = time.time() - t0
    times = json.loads((out/'train_time.json').read_text()) if (out/'train_time.json').is_file() else {}
    times[kind] = times.get(kind, 0) + dt
    (out/'train_time.json').write_text(json.dumps(times))
    print(f"{kind}: {'interrupted, rerun to continue' if learn.interrupted else 'done'} after {dt:.0f} s (total {times[kind]:.0f} s)")

def eval_hints(G, dl, n, seed=1234):
    "Mean per-image L1/SSIM of hint model `G` given `n` hints simulated from each true photo (batch j: hint_generator(seed, n, j))."
    sums, cnt, s = {}, 0, HintSampler()
    with torch.no_grad():
        for j, (A, B) in enumerate(dl):
            A, B = A.as_subclass(torch.Tensor), B.as_subclass(torch.Tensor)
            H = s(B, hint_generator(seed, n, j), n=n)
            P = generator_predictor(G)(A) if n == 0 else _predict(G, A, H)
            for k, v in image_metrics(P, B).items(): sums[k] = sums.get(k, 0.) + v.sum().item()
            cnt += len(A)
    return {k: round(v / cnt, 5) for k, v in sums.items()} | {'n': cnt}

def _predict(G, A, H):
    from pix2pix_nb.core import inference_mode
    with inference_mode(G): return G(A, H)

def wall_points(labels, sketch, k=2, margin=2):
    "`k` pixels of plain wall (label 'facade', no sketch line within `margin`), far apart: where a person would click."
    lb, sk = np.asarray(labels) == _LBL['facade'], np.asarray(sketch) > 127
    ok = lb & sk
    h, w = ok.shape
    pad = np.pad(ok, margin, constant_values=False)
    clear = np.ones_like(ok)
    for dy in range(2 * margin + 1):
        for dx in range(2 * margin + 1): clear &= pad[dy:dy + h, dx:dx + w]
    ys, xs = np.nonzero(clear)
    if not len(ys): raise ValueError('no clear wall pixel')
    first = np.argmin(ys * w + xs)                                            # top-left-most, then the farthest from it
    far = np.argmax((ys - ys[first]) ** 2 + (xs - xs[first]) ** 2)
    return [(int(xs[i]), int(ys[i])) for i in (first, far)][:k]

def three_walls(G_free, G_hint, size, images):
    "One stucco test sketch, hint-free and with two wall clicks in each of three colours; L1 against the design repainted in that colour."
    def wall_share(i):
        p = facade_spec(np.random.default_rng([0, 2, i]))
        return (np.asarray(render_facade(p, size)[2]) == _LBL['facade']).mean() if p['material'] == 'stucco' else 0
    i = max(range(106), key=wall_share)   # the stucco test building with the most plain wall: where a wall colour matters most
    p = facade_spec(np.random.default_rng([0, 2, i]))
    sk, ph, lb = render_facade(p, size)
    pts = wall_points(lb, sk)
    A = pil_to_tensor(sk.convert('RGB'))[None]
    cols, info = [A, generator_predictor(G_free)(A).cpu()], dict(test_index=i, points=pts, l1={})
    for name, c in COLORS.items():
        truth = pil_to_tensor(render_facade({**p, 'wall': c}, size)[1])[None]
        out = pil_to_tensor(colorize(G_hint, sk, hints=[Point(x, y, c) for x, y in pts]))[None]
        H = render_hints([Point(x, y, c) for x, y in pts], (size, size), (size, size))
        cols += [show_hints(H, A), out]
        info['l1'][name] = dict(hint_free=round(image_metrics(cols[1], truth)['l1'].item(), 4), hints=round(image_metrics(out, truth)['l1'].item(), 4))
    tile(cols, 128, pad=2).save(images/'hints_three_walls.jpg', quality=88)
    return info

def evaluate(out, images):
    cfg = PRESETS[PRESET]; size = cfg['size']
    G_free, G_hint = (load_generator(out/k/'generator.safetensors') for k in ('free', 'hints'))
    torch.set_num_threads(2)
    test = pair_dl('synthetic', 'test', size=size, bs=16, num_workers=0)
    res = {'hint-free model': eval_pairs(generator_predictor(G_free), test)}
    for n in N_HINTS: res[f'hint model, {n} hint{"s" * (n != 1)} from the truth'] = eval_hints(G_hint, test, n)
    # sheet of test facades
    A, B = next(iter(pair_dl('synthetic', 'test', size=size, bs=8, num_workers=0)))
    A, B = A.as_subclass(torch.Tensor), B.as_subclass(torch.Tensor)
    H = HintSampler()(B, hint_generator(1234, 5, 0), n=5)
    with torch.no_grad():
        cols = [A, B, generator_predictor(G_free)(A), generator_predictor(G_hint)(A), show_hints(H, A), _predict(G_hint, A, H)]
    tile(cols, 96, pad=2).save(images/'hints_test.jpg', quality=85)
    walls = three_walls(G_free, G_hint, size, images)
    times = json.loads((out/'train_time.json').read_text())
    info = dict(recipe={**cfg, 'preset': PRESET}, n_test=res['hint-free model']['n'], test=res, three_walls=walls,
                train_time_s={k: round(v) for k, v in times.items()}, hint_sampler=repr(HintSampler()),
                test_sheet_columns='sketch | truth | hint-free | hint model, no hints | 5 hints | hint model, 5 hints')
    (images/'hints_results.json').write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('what', choices=['train', 'eval'])
    ap.add_argument('kind', nargs='?', choices=['free', 'hints'])
    ap.add_argument('--out', default='runs/hints_exp'); ap.add_argument('--images', default='nbs/images')
    a = ap.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    if a.what == 'train': train(a.kind, out)
    else: evaluate(out, Path(a.images))
