"Checks of pix2pix_nb.generator / pix2pix_nb.patchgan that are broader than the notebook cells (grids of settings, round trips, errors)."
import json, pytest, torch, torch.nn as nn
from pix2pix_nb.generator import UnetGenerator, EncoderDecoder, get_norm, init_weights, n_params, n_downs_for
from pix2pix_nb.patchgan import PatchDiscriminator, PixelDiscriminator, receptive_field, measured_rf, conv_out_size

torch.set_num_threads(1)

@pytest.mark.parametrize('size,count', [(256, 54_413_955), (128, 41_828_995)])
def test_unet_reference_counts(size, count):
    assert n_params(UnetGenerator(size=size)) == count

@pytest.mark.parametrize('in_ch,norm,count', [(6, 'batch', 2_768_705), (3, 'instance', 2_764_737), (3, 'batch', 2_765_633)])
def test_patchgan_reference_counts(in_ch, norm, count):
    assert n_params(PatchDiscriminator(in_ch=in_ch, norm=norm)) == count

@pytest.mark.parametrize('cls', [UnetGenerator, EncoderDecoder])
@pytest.mark.parametrize('norm', ['batch', 'instance', 'none'])
@pytest.mark.parametrize('size', [32, 64, 128])
def test_generator_grid(cls, norm, size):
    g = init_weights(cls(ngf=4, size=size, norm=norm)).eval()
    h = json.loads(json.dumps(g.hparams))
    g2 = cls(**h); g2.load_state_dict(g.state_dict()); g2.eval()
    x = torch.randn(1, 3, size, 2*size)
    y = g(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    torch.testing.assert_close(y, g2(x))

@pytest.mark.parametrize('n_layers,rf', [(1, 16), (2, 34), (3, 70), (5, 286)])
def test_rf_measured_matches_computed(n_layers, rf):
    torch.manual_seed(n_layers)
    D = PatchDiscriminator(ndf=4, n_layers=n_layers, norm='batch')
    assert receptive_field(n_layers) == receptive_field(D) == rf
    h, w, _ = measured_rf(D, size=rf + 64)
    assert (h, w) == (rf, rf)
    assert D.training                       # measured_rf restores the mode

@pytest.mark.parametrize('n_layers', [1, 3, 5])
def test_patchgan_output_size_formula(n_layers):
    D = PatchDiscriminator(ndf=2, n_layers=n_layers).eval()
    for h, w in [(D.min_size, D.min_size + 5), (300, 301)]:
        assert D(torch.zeros(1, 6, h, w)).shape[-2:] == (conv_out_size(D, h), conv_out_size(D, w))

def test_hparams_rebuild_discriminators():
    for D in (PatchDiscriminator(in_ch=3, ndf=8, n_layers=2, norm='instance'), PixelDiscriminator(ndf=8, norm='none')):
        D2 = type(D)(**json.loads(json.dumps(D.hparams)))
        D2.load_state_dict(D.state_dict())

def test_channels_last_training_step_matches():
    "One optimiser step in channels_last gives the same weights as in contiguous format"
    torch.manual_seed(0)
    nets = [init_weights(UnetGenerator(ngf=4, size=32, dropout=False)), init_weights(PatchDiscriminator(in_ch=3, ndf=4, n_layers=1))]
    x = torch.randn(2, 3, 32, 32)
    for net in nets:
        a, b = net, type(net)(**net.hparams); b.load_state_dict(a.state_dict())
        b = b.to(memory_format=torch.channels_last)
        for m, inp in ((a, x), (b, x.to(memory_format=torch.channels_last))):
            opt = torch.optim.SGD(m.parameters(), 0.1); m(inp).square().mean().backward(); opt.step()
        for pa, pb in zip(a.parameters(), b.parameters()): torch.testing.assert_close(pa, pb, atol=1e-4, rtol=1e-4)

@pytest.mark.parametrize('make,msg', [
    (lambda: UnetGenerator(size=100), 'size=100'),
    (lambda: UnetGenerator(size=2048), 'size=2048'),
    (lambda: UnetGenerator(norm='layer'), "norm='layer'"),
    (lambda: UnetGenerator(ngf=0, size=32), 'ngf=0'),
    (lambda: UnetGenerator(n_downs=1), 'n_downs=1'),
    (lambda: PatchDiscriminator(ndf=-1), 'ndf=-1'),
    (lambda: PatchDiscriminator(n_layers=0), 'n_layers=0'),
    (lambda: PixelDiscriminator(norm=3), 'norm=3'),
    (lambda: UnetGenerator(ngf=2, size=32)(torch.zeros(1, 3, 40, 40)), 'multiples of 32'),
    (lambda: PatchDiscriminator(ndf=2)(torch.zeros(1, 3, 64, 64)), 'torch.cat([A, B], 1)'),
])
def test_bad_input_one_line_error(make, msg):
    with pytest.raises(ValueError) as e: make()
    assert msg in str(e.value) and '\n' not in str(e.value)

def test_custom_norm_callable():
    g = UnetGenerator(ngf=8, size=32, norm=lambda nf: nn.GroupNorm(2, nf))
    assert any(isinstance(m, nn.GroupNorm) for m in g.modules())
    assert g(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    assert get_norm('none') is None and n_downs_for(1024) == 10
