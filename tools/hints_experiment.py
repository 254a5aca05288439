"""Colour hints on the synthetic test split: a hint-free generator against a hint generator (chapter 08).

    python tools/hints_experiment.py train free  [--out runs/hints_exp]   # the hint-free model
    python tools/hints_experiment.py train hints [--out runs/hints_exp]   # the same recipe, fit(hints=HintSampler())
    python tools/hints_experiment.py eval        [--out runs/hints_exp] [--images nbs/images]

Both models use `PRESETS['hints-cpu']` (64 px, same data, seed, nets and epochs). A `train` run stopped by SIGTERM
(e.g. `timeout -s TERM 420 ...`, to keep each hold of a shared CPU short) saves a checkpoint; the same command
continues it exactly. `eval` scores both on the 106 synthetic test facades with `image_metrics` (per-image L1 and
SSIM): the hint-free model, and the hint model given 0, 1, 5 and 20 hints simulated from the true photo by
`EVAL_SAMPLER` (pinned: the same hints for every run, whatever the model was trained with), and writes to --images:
`hints_results.json`, `hints_test.jpg` (sketch | truth | hint-free | hints, none given | the 5 hints | hints, 5 given)
and `hints_three_walls.jpg` (one stucco test sketch: hint-free, then two clicks on the wall in each of three colours,
as a person would give them through `colorize`).

Region-filled hints (issue #19): `train hints --out runs/hints_region --sampler fill=region` trains with
`HintSampler(fill='region')` and writes `hint_fill='region'` into the exported sidecar; `eval --out runs/hints_region
--free runs/hints_v2/free` then spreads the same pinned test hints over the sketch regions for that model (and
`colorize` spreads the three-walls clicks), so both hint models are scored on the same clicks.

Screening a recipe change (chapter 08's table): `train hints --out runs/hints_x --set epochs=18 epochs_decay=9
[dropout=False] [--sampler p_none=0.1 max_frac=0.125]` (`--set` overrides the preset for either kind, `--sampler`
the `HintSampler` arguments), then `eval --out runs/hints_x --free runs/hints_exp/free --quick` (prints, writes only
OUT/hints_three_walls.jpg).
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
from pix2pix_nb.hints import HintSampler, hint_generator, show_hints, render_hints, Point, spread_hints, hint_fill, hint_meta
from pix2pix_nb.inference import colorize
from pix2pix_nb.train import fit, PRESETS

PRESET = 'hints-cpu'
N_HINTS = (0, 1, 5, 20)
COLORS = {'pink': (240, 160, 180), 'blue': (150, 190, 240), 'yellow': (245, 220, 110)}

EVAL_SAMPLER = HintSampler(n_max=24, p=1/8, p_none=.25, max_frac=1/16)   # the test hints: uniform places, boxes up to 4 px at 64 px, fixed for every run

def _kv(items):
    "['a=1', 'b=.5', 'c=False'] -> {'a': 1, 'b': .5, 'c': False}"
    def val(v):
        try: return json.loads(v.lower() if v in ('True', 'False') else v)
        except ValueError: return v   # a bare word: fill=region
    return {k: val(v) for k, v in (i.split('=', 1) for i in items or [])}

def recipe(kind, sets=None, sampler=None):
    "fit's keyword arguments for `kind` ('free' or 'hints'): the preset, `sets` overrides, and for 'hints' a `HintSampler(**sampler)`."
    cfg = {**PRESETS[PRESET], **(sets or {})}
    cfg['hints'] = HintSampler(**(sampler or {})) if kind == 'hints' else False
    return cfg

def train(kind, out, sets=None, sampler=None):
    cfg = recipe(kind, sets, sampler)
    run = out/kind
    if (run/'generator.safetensors').is_file(): print(f'{run}: already trained'); return
    (out/f'recipe_{kind}.json').write_text(json.dumps({**cfg, 'hints': repr(cfg['hints']) if cfg['hints'] else False}))
    t0 = time.time()
    learn = fit('synthetic', out=run, progress=False, save_every=1, resume=True if (run/'checkpoint.pt').is_file() else None, **cfg)
    dt = time.time() - t0
    times = json.loads((out/'train_time.json').read_text()) if (out/'train_time.json').is_file() else {}
    times[kind] = times.get(kind, 0) + dt
    (out/'train_time.json').write_text(json.dumps(times))
    print(f"{kind}: {'interrupted, rerun to continue' if learn.interrupted else 'done'} after {dt:.0f} s (total {times[kind]:.0f} s)")
    if not learn.interrupted and hint_meta(cfg['hints']): record_fill(run/'generator.safetensors', cfg['hints'])

def record_fill(path, sampler):
    "Write the sampler's `hint_meta` (hint_fill='region') into the exported sidecar, so `colorize` spreads clicks as training did."
    info = json.loads(path.with_suffix('.json').read_text())
    path.with_suffix('.json').write_text(json.dumps({**info, **hint_meta(sampler)}, indent=1))

def eval_hints(G, dl, n, seed=1234):
    "Mean per-image L1/SSIM of hint model `G` given `n` hints simulated from each true photo (batch j: hint_generator(seed, n, j))."
    sums, cnt, s = {}, 0, EVAL_SAMPLER
    with torch.no_grad():
        for j, (A, B) in enumerate(dl):
            A, B = A.as_subclass(torch.Tensor), B.as_subclass(torch.Tensor)
            H = _spread(G, s(B, hint_generator(seed, n, j), n=n), A)
            P = generator_predictor(G)(A) if n == 0 else _predict(G, A, H)
            for k, v in image_metrics(P, B).items(): sums[k] = sums.get(k, 0.) + v.sum().item()
            cnt += len(A)
    return {k: round(v / cnt, 5) for k, v in sums.items()} | {'n': cnt}

def _spread(G, H, A):
    "The pinned test hints as model `G` was trained to see them: spread over the sketch regions for a fill='region' model."
    return spread_hints(H, A) if hint_fill(G) == 'region' else H

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
        H = render_hints([Point(x, y, c) for x, y in pts], (size, size), (size, size), fill=hint_fill(G_hint), sketch=A)
        cols += [show_hints(H, A), out]
        info['l1'][name] = dict(hint_free=round(image_metrics(cols[1], truth)['l1'].item(), 4), hints=round(image_metrics(out, truth)['l1'].item(), 4))
    tile(cols, 128, pad=2).save(images/'hints_three_walls.jpg', quality=88)
    return info

def evaluate(out, images, free=None, quick=False):
    free = Path(free) if free else out/'free'
    cfg = json.loads((out/'recipe_hints.json').read_text()) if (out/'recipe_hints.json').is_file() else {**PRESETS[PRESET], 'hints': repr(HintSampler())}
    size = cfg['size']
    G_free, G_hint = load_generator(free/'generator.safetensors'), load_generator(out/'hints'/'generator.safetensors')
    torch.set_num_threads(2)
    test = pair_dl('synthetic', 'test', size=size, bs=16, num_workers=0)
    res = {'hint-free model': eval_pairs(generator_predictor(G_free), test)}
    for n in ((0, 5) if quick else N_HINTS): res[f'hint model, {n} hint{"s" * (n != 1)} from the truth'] = eval_hints(G_hint, test, n)
    if quick:
        f = res['hint-free model']['l1']
        for k, v in res.items(): print(f"{k:40s} L1 {v['l1']:.4f} ({(v['l1'] / f - 1) * 100:+.1f} %)  SSIM {v['ssim']:.4f}")
        walls = three_walls(G_free, G_hint, size, out)
        print('three walls:', walls['l1']); return
    # sheet of test facades
    A, B = next(iter(pair_dl('synthetic', 'test', size=size, bs=8, num_workers=0)))
    A, B = A.as_subclass(torch.Tensor), B.as_subclass(torch.Tensor)
    H = _spread(G_hint, EVAL_SAMPLER(B, hint_generator(1234, 5, 0), n=5), A)
    with torch.no_grad():
        cols = [A, B, generator_predictor(G_free)(A), generator_predictor(G_hint)(A), show_hints(H, A), _predict(G_hint, A, H)]
    tile(cols, 96, pad=2).save(images/'hints_test.jpg', quality=85)
    walls = three_walls(G_free, G_hint, size, images)
    times = {**json.loads((free.parent/'train_time.json').read_text()), **json.loads((out/'train_time.json').read_text())}
    info = dict(recipe={**cfg, 'preset': PRESET}, n_test=res['hint-free model']['n'], test=res, three_walls=walls,
                train_time_s={k: round(v) for k, v in times.items() if k in ('free', 'hints')}, hint_sampler=cfg['hints'], test_hints=repr(EVAL_SAMPLER),
                test_sheet_columns='sketch | truth | hint-free | hint model, no hints | 5 hints | hint model, 5 hints')
    (images/'hints_results.json').write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('what', choices=['train', 'eval'])
    ap.add_argument('kind', nargs='?', choices=['free', 'hints'])
    ap.add_argument('--out', default='runs/hints_exp'); ap.add_argument('--images', default='nbs/images')
    ap.add_argument('--set', nargs='*', metavar='KEY=VALUE', help="train: override fit's preset arguments (both kinds), e.g. epochs=18 epochs_decay=9")
    ap.add_argument('--sampler', nargs='*', metavar='KEY=VALUE', help='train hints: HintSampler arguments, e.g. p_none=0.1')
    ap.add_argument('--free', help='eval: the hint-free run folder (default OUT/free)')
    ap.add_argument('--quick', action='store_true', help='eval: print L1/SSIM with 0 and 5 hints and the three walls, write nothing')
    a = ap.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    if a.what == 'train': train(a.kind, out, _kv(a.set), _kv(a.sampler))
    else: evaluate(out, Path(a.images), a.free, a.quick)
