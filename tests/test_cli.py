"""The command-line tools as people use them: every CLI x preset x representative flags trains and writes its files or
exits 2 with one line naming the culprit; the flags match the Python API; output to a file is one line per epoch."""
import os, sys, json, inspect, subprocess
from pathlib import Path
import pytest
from pix2pix_nb.synthetic import synthetic_facades
from pix2pix_nb.cyclegan import unpaired_split, fit_cyclegan
from pix2pix_nb.train import fit, demo, PRESETS
from pix2pix_nb.cli import (cli_parser, merge_preset, pix2pix_train, pix2pix_cyclegan, pix2pix_demo, CYCLEGAN_PRESETS,
                            TRAIN_API_ONLY, CYCLEGAN_API_ONLY, pix2pix_colorize, colorize_cli, COLORIZE_POSITIONAL)

BIN = Path(sys.executable).parent

def run(cmd, *args, timeout=300, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if 'stdout' not in kw: kw['capture_output'] = True
    return subprocess.run([str(BIN/cmd), *map(str, args)], text=True, timeout=timeout, env=env, **kw)

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('clidata')
    paired = synthetic_facades(d/'paired', n_train=8, n_val=2, n_test=2, size=32)
    unpaired_split(paired, d/'unpaired', 'train')
    return paired, d/'unpaired'

TINY_P2P = ['--size', 32, '--bs', 4, '--ngf', 8, '--ndf', 8, '--n_layers', 2, '--epochs', 1, '--num_workers', 0, '--n_grid', 2]
TINY_CG = ['--size', 32, '--bs', 2, '--ngf', 8, '--ndf', 8, '--n_blocks', 1, '--n_layers', 2, '--epochs', 1, '--num_workers', 0, '--n_grid', 2]

# ------------------------------------------------------------------ parity with the Python API
@pytest.mark.parametrize('f, api_only', [(fit, TRAIN_API_ONLY), (fit_cyclegan, CYCLEGAN_API_ONLY), (demo, ()), (colorize_cli, COLORIZE_POSITIONAL)])
def test_every_argument_is_a_flag_with_the_same_default(f, api_only):
    p = cli_parser(f, 'x', api_only)
    sig = inspect.signature(f).parameters
    assert set(p.api_flags) == set(sig) - set(api_only)
    for k, v in p.api_flags.items(): assert v == sig[k].default, k
    flags = {s for a in p._actions for s in a.option_strings}
    for k, v in p.api_flags.items():
        assert f'--{k}' in flags and (not isinstance(v, bool) or f'--no_{k}' in flags), k

def test_presets_merge_in_one_place():
    assert merge_preset(PRESETS, 'cpu', {})['num_workers'] == 0
    assert merge_preset(PRESETS, 'cpu', {'num_workers': 2})['num_workers'] == 2        # the old crash: explicit + preset
    assert merge_preset(PRESETS, 'cpu', {'epochs': 4}) == {**{k: v for k, v in PRESETS['cpu'].items() if k != 'epochs_decay'}, 'epochs': 4}
    assert merge_preset(CYCLEGAN_PRESETS, 'paper', {'size': 64})['size'] == 64
    assert merge_preset(PRESETS, None, {'size': 64}) == {'size': 64}

# ------------------------------------------------------------------ bad values: one line, exit status 2
BAD = [(['--size', 7], 'size=7'), (['--epochs', -1], 'epochs=-1'), (['--preset', 'nope'], "--preset 'nope'"),
       (['--precision', 'fp8'], "precision='fp8'"), (['--size', 'big'], "--size: invalid int value: 'big'"), (['--bogus', 1], '--bogus')]

def _one_line_exit2(f, argv, capsys, needle):
    try: code = f([str(a) for a in argv])
    except SystemExit as e: code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1 and needle in err and 'Traceback' not in err, (code, err)

@pytest.mark.parametrize('args, needle', BAD + [(['--source', '/no/such/folder'], '/no/such/folder')])
def test_train_bad_values(data, tmp_path, capsys, args, needle):
    _one_line_exit2(pix2pix_train, ['--source', data[0], '--out', tmp_path/'o', *TINY_P2P, *args], capsys, needle)

@pytest.mark.parametrize('args, needle', BAD + [(['--source_a', '/no/such/folder'], '/no/such/folder')])
def test_cyclegan_bad_values(data, tmp_path, capsys, args, needle):
    _one_line_exit2(pix2pix_cyclegan, ['--source_a', data[1], '--valid', data[0], '--out', tmp_path/'o', *TINY_CG, *args], capsys, needle)

@pytest.mark.parametrize('args, needle', [(['--preset', 'nope'], "preset='nope'"), (['--preset', 'facades-cpu'], 'pix2pix_train --preset facades-cpu'), (['--epochs', -1], 'epochs=-1'),
                                          (['--device', 'gpu7'], "device='gpu7'"), (['--bogus'], '--bogus')])
def test_demo_bad_values(tmp_path, capsys, args, needle):
    _one_line_exit2(pix2pix_demo, ['--out', tmp_path/'o', *args], capsys, needle)

@pytest.fixture(scope='module')
def colorize_model(tmp_path_factory):
    from PIL import Image
    from pix2pix_nb.generator import UnetGenerator, export_generator
    d = tmp_path_factory.mktemp('colorize')
    (d/'in').mkdir(); Image.new('L', (40, 30), 255).save(d/'in'/'a.png')
    return export_generator(UnetGenerator(ngf=4, size=32), d/'g.safetensors'), d/'in'

@pytest.mark.parametrize('args, needle', [(['--bs', 0], 'bs=0'), (['--bs', 'two'], "--bs: invalid int value: 'two'"), (['--size', -8], 'size=-8'),
                                          (['--precision', 'fp8'], "precision='fp8'"), (['--device', 'gpu7'], "device='gpu7'"),
                                          (['--hints', '/no/such/folder'], 'takes none'), (['--bogus', 1], '--bogus')])
def test_colorize_bad_values(colorize_model, tmp_path, capsys, args, needle):
    _one_line_exit2(pix2pix_colorize, [*colorize_model, '-o', tmp_path/'o', *args], capsys, needle)
    assert not (tmp_path/'o').exists()   # refused before anything was written

def test_colorize_flags(colorize_model, tmp_path, capsys):
    for flags in (['--bs', 1, '--precision', 'fp32'], ['--bs', 3, '--precision', 'bf16', '--channels_last'], ['--precision', 'auto', '--no_channels_last']):
        assert pix2pix_colorize([*colorize_model, '-o', tmp_path/'o', '--quiet', '--overwrite', *flags]) == 0, flags
        assert '1 written' in capsys.readouterr().out

def test_bad_value_in_the_real_console_scripts(data, tmp_path):
    for cmd, args in (('pix2pix_train', ['--source', data[0], '--size', 7]), ('pix2pix_cyclegan', ['--source_a', data[1], '--size', 7]),
                      ('pix2pix_demo', ['--preset', 'nope'])):
        r = run(cmd, *args, '--out', tmp_path/cmd)
        assert r.returncode == 2 and r.stderr.count('\n') == 1 and r.stderr.startswith(f'{cmd}: error:'), (cmd, r.stderr[-2000:])

# ------------------------------------------------------------------ the matrix: each CLI x preset x representative flags
P2P_CASES = [
    (None, ['--precision', 'fp32', '--device', 'cpu', '--no_export']),
    ('cpu', ['--direction', 'BtoA', '--norm', 'instance']),
    ('paper', ['--precision', 'bf16', '--channels_last', '--generator', 'resnet']),
    ('facades-cpu', ['--upsample', 'resize', '--gan_loss', 'lsgan']),          # its source is overridden by --source
]
@pytest.mark.parametrize('preset, flags', P2P_CASES)
def test_train_matrix(data, tmp_path, preset, flags):
    out = tmp_path/'run'
    r = run('pix2pix_train', '--source', data[0], '--out', out, *(['--preset', preset] if preset else []), *TINY_P2P, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {'config.json', 'checkpoint.pt', 'epoch_000.png', 'losses.png'} <= files, files
    assert ('generator.safetensors' in files) == ('--no_export' not in flags)
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['size'], cfg['epochs'], cfg['ngf']) == (32, 1, 8)          # explicit flags beat the preset
    if preset: assert cfg['lr'] == PRESETS[preset]['lr']
    if '--direction' in flags: assert cfg['direction'] == 'BtoA' and cfg['norm'] == 'instance'
    if '--generator' in flags: assert cfg['generator'] == 'resnet' and cfg['precision'] == 'bf16' and cfg['channels_last']
    if '--upsample' in flags: assert cfg['upsample'] == 'resize' and cfg['gan_loss'] == 'lsgan_loss' and cfg['source'] == str(data[0])
    r = run('pix2pix_train', '--source', data[0], '--out', out, *(['--preset', preset] if preset else []), *TINY_P2P, *flags, '--resume', 'last')
    assert r.returncode == 2 and 'nothing left to train' in r.stderr and r.stderr.count('\n') == 1, r.stderr[-2000:]

CG_CASES = [(None, ['--generator', 'unet', '--norm', 'batch', '--no_export']), ('cpu', ['--precision', 'fp32']), ('paper', ['--precision', 'bf16'])]
@pytest.mark.parametrize('preset, flags', CG_CASES)
def test_cyclegan_matrix(data, tmp_path, preset, flags):
    out = tmp_path/'run'
    r = run('pix2pix_cyclegan', '--source_a', data[1], '--valid', data[0], '--out', out, *(['--preset', preset] if preset else []), *TINY_CG, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {'config.json', 'checkpoint.pt', 'grid_A', 'grid_B', 'losses.png'} <= files, files
    assert ('generator.safetensors' in files) == ('--no_export' not in flags)
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['size'], cfg['epochs'], cfg['ngf']) == (32, 1, 8)

# ------------------------------------------------------------------ output to a file: one line per epoch
def test_log_file_gets_one_line_per_epoch(data, tmp_path):
    log = tmp_path/'log'
    with open(log, 'w') as f:
        r = run('pix2pix_train', '--source', data[0], '--out', tmp_path/'run', *TINY_P2P[:-6], '--epochs', 2, '--num_workers', 0, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    assert '\r' not in text and 'Warning' not in text, text
    lines = text.strip().splitlines()
    assert [l.split(':')[0] for l in lines] == ['epoch 0', 'epoch 1'], lines
    assert all('train_loss=' in l and 'valid_loss=' in l for l in lines), lines
