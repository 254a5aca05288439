"""Colour hints (chapter 08): simulated hints, the hint channels, training with hints (repeatable, exact resume), user hints in colorize."""
import os, signal
import numpy as np, pytest, torch
from PIL import Image, ImageDraw
from fastai.callback.core import Callback
from pix2pix_nb.synthetic import synthetic_facades, synthetic_triple
from pix2pix_nb.hints import (HINT_CH, HintSampler, HintCallback, hint_counts, random_boxes, box_means, paint_hints, hint_generator,
                              render_hints, parse_color, Point, Stroke, show_hints)
from pix2pix_nb.generator import UnetGenerator, ResnetGenerator, make_generator, load_generator, export_generator
from pix2pix_nb.gan import pix2pix_nets
from pix2pix_nb.train import fit, PRESETS
from pix2pix_nb.callbacks import read_checkpoint
from pix2pix_nb.inference import colorize
from pix2pix_nb.cli import cli_parser, TRAIN_API_ONLY

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return synthetic_facades(tmp_path_factory.mktemp('hsynth'), n_train=8, n_val=2, n_test=2, size=32)

# ------------------------------------------------------------------ simulated hints
def test_box_means_match_slicing():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(3, 3, 17, 23, generator=g)
    bx = random_boxes(3, 7, 17, 23, 6, g)
    assert (bx[..., 2] <= 17).all() and (bx[..., 3] <= 23).all() and (bx[..., :2] >= 0).all()
    ref = torch.stack([torch.stack([img[i, :, a:c, b:d].mean((1, 2)) for a, b, c, d in bx[i].tolist()]) for i in range(3)])
    torch.testing.assert_close(box_means(img, bx), ref)

def test_sampler_hints_are_target_colours_and_repeatable():
    B = torch.rand(4, 3, 32, 32) * 2 - 1
    s = HintSampler()
    H = s(B, hint_generator(0, 1, 2), n=5)
    assert H.shape == (4, HINT_CH, 32, 32) and set(H[:, 3].unique().tolist()) <= {0., 1.}
    assert (H[:, :3] * (1 - H[:, 3:])).abs().sum() == 0                     # colour only under the mask
    assert torch.equal(H, s(B, hint_generator(0, 1, 2), n=5))               # same keys, same hints
    assert not torch.equal(H, s(B, hint_generator(0, 1, 3), n=5))
    flat = torch.ones(2, 3, 32, 32) * torch.tensor([.5, -.2, .1])[:, None, None]
    Hf = s(flat, hint_generator(1), n=3); m = Hf[:, 3] > 0
    torch.testing.assert_close(Hf[:, :3].permute(0, 2, 3, 1)[m], torch.tensor([.5, -.2, .1]).expand(int(m.sum()), 3))

def test_counts_follow_the_recipe():
    c = hint_counts(20_000, n_max=24, p=1/8, p_none=.25, gen=torch.Generator().manual_seed(0))
    assert abs((c == 0).float().mean().item() - .25) < .02 and int(c.max()) == 24 and 6 < c[c > 0].float().mean() < 9

def test_paint_respects_keep():
    bx = torch.tensor([[[0, 0, 2, 2], [4, 4, 6, 6]]])
    H = paint_hints(bx, torch.tensor([[[1., 0, 0], [0, 1., 0]]]), torch.tensor([[True, False]]), 8, 8)
    assert H[0, 3].sum() == 4 and H[0, :, 5, 5].abs().sum() == 0

def test_sampler_is_counts_then_uniform_boxes():
    "The recipe, pinned: geometric counts, then uniformly placed boxes, each filled with the target's mean there (the test hints of chapter 08 depend on it)."
    B = torch.rand(3, 3, 32, 32) * 2 - 1
    g1, g2 = hint_generator(7), hint_generator(7)
    c = hint_counts(3, gen=g2); k = max(1, int(c.max())); bx = random_boxes(3, k, 32, 32, 2, g2)
    ref = paint_hints(bx, box_means(B, bx), torch.arange(k)[None] < c[:, None], 32, 32)
    assert torch.equal(HintSampler()(B, g1), ref)

@pytest.mark.parametrize('bad, msg', [(dict(n_max=0), 'n_max=0'), (dict(p=0), 'p=0'), (dict(p_none=1.5), 'p_none=1.5'), (dict(max_frac=-1), 'max_frac=-1')])
def test_sampler_bad_settings(bad, msg):
    with pytest.raises(ValueError, match=msg): HintSampler(**bad)

# ------------------------------------------------------------------ hint channels
@pytest.mark.parametrize('cls', [UnetGenerator, ResnetGenerator])
def test_generator_without_hints_is_zero_hints(cls, tmp_path):
    kw = dict(ngf=4, size=32) if cls is UnetGenerator else dict(ngf=4, n_blocks=1)
    g = cls(hint_ch=HINT_CH, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): assert torch.equal(g(x), g(x, torch.zeros(2, 4, 32, 32)))
    with pytest.raises(ValueError, match=r'\(2, 4, 32, 32\)'): g(x, torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match='hint_ch=0'): cls(**kw)(x, torch.zeros(2, 4, 32, 32))

def test_discriminator_still_judges_pairs():
    G, D = pix2pix_nets(size=32, ngf=4, ndf=4, n_layers=2, hint_ch=HINT_CH)
    assert G.hparams['hint_ch'] == 4 and D.hparams['in_ch'] == 6

# ------------------------------------------------------------------ training with hints
class Spy(Callback):
    "Records every training batch's hints (after HintCallback) by (epoch, batch)."
    order = 0
    def __init__(self): self.seen = {}
    def before_batch(self):
        if self.training: self.seen[(getattr(self.learn, 'epoch_offset', 0) + self.epoch, self.iter)] = self.xb[1].clone()

class SignalAt(Callback):
    def __init__(self, epoch, it): self.at = (epoch, it)
    def after_batch(self):
        if self.training and (self.epoch, self.iter) == self.at: os.kill(os.getpid(), signal.SIGTERM)

def tiny_fit(data, out, seed=0, cbs=(), hints=True, **kw):
    return fit(data, epochs=2, epochs_decay=1, size=32, bs=2, ngf=8, ndf=8, n_layers=2, num_workers=0, out=out, hints=hints,
               progress=False, precision='fp32', seed=seed, cbs=list(cbs), **kw)

def weights(learn): return {k: v.clone() for k, v in learn.model.state_dict().items()}

def test_same_seed_same_hints_and_resume_is_exact(data, tmp_path):
    s1, s2, s3 = Spy(), Spy(), Spy()
    full = tiny_fit(data, tmp_path/'a', cbs=[s1])
    tiny_fit(data, tmp_path/'b', cbs=[s2])
    assert s1.seen.keys() == s2.seen.keys() and all(torch.equal(s1.seen[k], s2.seen[k]) for k in s1.seen)
    assert any(v[:, 3].sum() > 0 for v in s1.seen.values())
    part = tiny_fit(data, tmp_path/'c', cbs=[SignalAt(1, 1)])                  # SIGTERM mid-epoch: checkpoint, stop
    assert part.interrupted and read_checkpoint(tmp_path/'c'/'checkpoint.pt')['batch'] == 2
    res = tiny_fit(data, tmp_path/'c', seed=5, cbs=[s3], resume=True)         # another seed: all state from the checkpoint
    assert all(torch.equal(s1.seen[k], v) for k, v in s3.seen.items()) and (1, 2) in s3.seen
    a, b = weights(full), weights(res)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    other = Spy(); tiny_fit(data, tmp_path/'d', seed=1, cbs=[other])
    assert not torch.equal(other.seen[(0, 0)], s1.seen[(0, 0)])

def test_fit_records_hints_and_colorize_uses_them(data, tmp_path):
    tiny_fit(data, tmp_path/'h')
    G = load_generator(tmp_path/'h'/'generator.safetensors')
    assert G.hparams['hint_ch'] == HINT_CH and G.meta['hints'] is True
    assert G.meta.get('hint_fill') == 'region'   # fit(hints=True) spreads hints over sketch regions, and colorize knows it
    sk = synthetic_triple(0, 'test', size=40)[0]
    plain, hinted = colorize(G, sk), colorize(G, sk, hints=[Point(20, 20, 'pink'), Stroke([(2, 30), (30, 30)], '#3060c0')])
    assert plain.size == hinted.size == (40, 40) and not np.array_equal(np.asarray(plain), np.asarray(hinted))
    layer = Image.new('RGBA', (40, 40), (0, 0, 0, 0)); ImageDraw.Draw(layer).ellipse([15, 15, 22, 22], fill=(240, 160, 180, 255))
    outs = colorize(G, [sk, sk], hints=[None, layer])
    assert np.array_equal(np.asarray(outs[0]), np.asarray(plain))
    with pytest.raises(ValueError, match='2 hint entries for 3 images'): colorize(G, [sk] * 3, hints=[None, None])
    with pytest.raises(ValueError, match='outside the 40×40'): colorize(G, sk, hints=[(50, 5, 'red')])
    cfg = (tmp_path/'h'/'config.json').read_text()
    assert 'HintSampler(' in cfg

def test_hint_free_model_refuses_hints(data, tmp_path):
    g = UnetGenerator(ngf=4, size=32)
    with pytest.raises(ValueError, match='takes none'): colorize(g, Image.new('L', (32, 32), 255), hints=[(1, 1, 'red')])

def test_hints_option_everywhere():
    assert '--hints' in {s for a in cli_parser(fit, 'x', TRAIN_API_ONLY)._actions for s in a.option_strings}
    assert PRESETS['hints-cpu']['hints'] is True
    with pytest.raises(ValueError, match="hints='on'"): fit('synthetic', epochs=1, hints='on', out='/nonexistent/x')

@pytest.mark.parametrize('c, want', [('pink', (255, 192, 203)), ('#102030', (16, 32, 48)), ((1, 2, 3), (1, 2, 3)), (np.array([4, 5, 6]), (4, 5, 6))])
def test_parse_color(c, want): assert parse_color(c) == want

@pytest.mark.parametrize('bad, msg', [((256, 0, 0), r'\(256, 0, 0\)'), ((1., 0, 0), r'\(1.0, 0, 0\)'), ('nope', "'nope'"), (5, 'hint colour 5'), ((1, 2), r'\(1, 2\)')])
def test_bad_colours_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg): parse_color(bad)

@pytest.mark.parametrize('hints, msg', [([Point(-1, 5, 'red')], r'\(-1, 5\) is outside'), ([Stroke([(1, 1), (1, 99)], 'red')], r'\(1, 99\) is outside'),
                                        ([('x', 5, 'red')], "hint \\('x'"), (np.zeros((10, 10, 3), np.uint8), r'shape \(10, 10, 3\)'),
                                        (Image.new('RGB', (40, 30)), 'alpha'), (Image.new('RGBA', (30, 40)), '30×40 does not match the 40×30')])
def test_bad_user_hints_are_one_line(hints, msg):
    with pytest.raises(ValueError, match=msg) as e: render_hints(hints, (40, 30), (40, 30))
    assert '\n' not in str(e.value)

def test_show_hints_paints_colour_over_faded_sketch():
    H = torch.zeros(1, 4, 4, 4); H[0, :, 1, 1] = torch.tensor([1., -1, -1, 1])
    v = show_hints(H, -torch.ones(1, 3, 4, 4))
    assert v[0, :, 1, 1].tolist() == [1., -1., -1.] and torch.allclose(v[0, :, 0, 0], torch.full((3,), .4))

# ------------------------------------------------------------------ region-filled hints
from pix2pix_nb.hints import sketch_regions, spread_hints, hint_fill, hint_meta

def box_sketch():
    "A 16×16 hand-made sketch: a frame line at x=8 and a closed 4×4 window (lines at rows/cols 2 and 7) on the left: three regions."
    a = np.full((16, 16), 255, np.uint8)
    a[:, 8] = 0; a[2, 2:8] = a[7, 2:8] = 0; a[2:8, 2] = a[2:8, 7] = 0
    return a

def test_region_fill_of_a_hand_made_sketch():
    a = box_sketch(); A = torch.from_numpy(a).float().div(127.5).sub(1).expand(1, 3, 16, 16)
    R = sketch_regions(A)[0]
    assert R.shape == (16, 16) and (R[torch.from_numpy(a == 0)] == 0).all() and len(R.unique()) == 4   # lines + left wall, window, right
    H = torch.zeros(1, 4, 16, 16); H[0, :, 4, 4] = torch.tensor([.2, .4, .6, 1]); H[0, :, 5, 5] = torch.tensor([.4, .6, .8, 1])   # two clicks in the window
    H[0, :, 10, 12] = torch.tensor([-1, 0, 1, 1]); H[0, :, 2, 4] = torch.tensor([1, 1, 1, 1])                                     # one right, one on a line
    S = spread_hints(H, A)[0]
    win, right = R == R[4, 4], R == R[10, 12]
    assert torch.equal(S[3] > 0, win | right | (torch.arange(16)[:, None] == 2) & (torch.arange(16) == 4))
    torch.testing.assert_close(S[:3, win].T, torch.tensor([.3, .5, .7]).expand(int(win.sum()), 3))   # the mean of the window's hints
    torch.testing.assert_close(S[:3, right].T, torch.tensor([-1., 0, 1]).expand(int(right.sum()), 3))
    assert S[:, 2, 4].tolist() == [1, 1, 1, 1] and S[3, 0, 0] == 0                                    # on a line: as given; left wall: no hint
    torch.testing.assert_close(spread_hints(S[None], A)[0], S)                                      # spreading twice changes nothing

def test_region_sampler_same_draws_same_seed_needs_sketch():
    A = torch.from_numpy(box_sketch()).float().div(127.5).sub(1).expand(2, 3, 16, 16)
    B = torch.rand(2, 3, 16, 16) * 2 - 1
    s, b = HintSampler(fill='region'), HintSampler()
    H = s(B, hint_generator(3, 1), n=4, A=A)
    assert torch.equal(H, s(B, hint_generator(3, 1), n=4, A=A))                   # same keys, same hints
    assert torch.equal(H, spread_hints(b(B, hint_generator(3, 1), n=4), A))       # the sparse hints, spread: same random draws
    assert not torch.equal(H, s(B, hint_generator(3, 2), n=4, A=A))
    assert "fill='region'" in repr(s) and 'fill' not in repr(b)
    with pytest.raises(ValueError, match='needs the sketches'): s(B, hint_generator(0))
    with pytest.raises(ValueError, match="fill='blob'"): HintSampler(fill='blob')

class PairSpy(Callback):
    order = 0
    def __init__(self): self.seen = {}
    def before_batch(self):
        if self.training: self.seen[(self.epoch, self.iter)] = (self.xb[0].clone(), self.xb[1].clone())

def test_region_training_repeatable_and_recorded(data, tmp_path):
    s1, s2 = PairSpy(), PairSpy()
    l1 = tiny_fit(data, tmp_path/'a', cbs=[s1], hints=HintSampler(fill='region'))
    tiny_fit(data, tmp_path/'b', cbs=[s2], hints=HintSampler(fill='region'))
    assert all(torch.equal(s1.seen[k][1], s2.seen[k][1]) for k in s1.seen)
    for A, H in s1.seen.values(): torch.testing.assert_close(spread_hints(H, A), H)   # every training hint is region-filled
    assert sum(H[:, 3].sum() for _, H in s1.seen.values()) > 0
    assert hint_fill(l1.model.G) == 'region'                                     # in memory: colorize spreads as training did
    G = load_generator(tmp_path/'a'/'generator.safetensors'); G.meta.pop('hint_fill', None)
    assert hint_fill(G) == 'box'                                                  # an older file: sparse, as before
    export_generator(G, tmp_path/'r.safetensors', **hint_meta(HintSampler(fill='region')))
    assert hint_fill(load_generator(tmp_path/'r.safetensors')) == 'region' and hint_meta(HintSampler()) == {}

def test_colorize_with_a_point_fills_the_region():
    g = UnetGenerator(ngf=4, size=32, hint_ch=HINT_CH).eval()
    seen = []; g.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    sk = Image.fromarray(np.kron(box_sketch(), np.ones((2, 2), np.uint8)))      # 32×32, 2 px lines
    colorize(g, sk, hints=[Point(8, 8, (255, 0, 0), size=1)])
    assert seen[-1][0, 3].sum() == 1                                              # an old (sparse) model: one pixel
    g.hint_fill = 'region'
    colorize(g, sk, hints=[Point(8, 8, (255, 0, 0), size=1)])
    H = seen[-1][0]; R = sketch_regions(pil_rgb(sk))[0]
    assert torch.equal(H[3] > 0, R == R[8, 8]) and torch.allclose(H[:3, 8, 10], torch.tensor([1., -1, -1]))
    layer = np.zeros((32, 32, 4), np.uint8); layer[24, 24] = (0, 0, 255, 255)    # an RGBA layer is spread too
    colorize(g, sk, hints=layer)
    assert torch.equal(seen[-1][0, 3] > 0, R == R[24, 24])

def pil_rgb(im): return torch.from_numpy(np.asarray(im.convert('RGB'))).permute(2, 0, 1)[None].float().div(127.5).sub(1)
