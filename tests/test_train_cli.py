"""pix2pix_train / pix2pix_demo command lines: help, one-line errors, a tiny real run, resume from the CLI."""
import sys, json, subprocess
from pathlib import Path
import pytest
from pix2pix_nb.data import synthetic_facades

BIN = Path(sys.executable).parent

def run(*args, timeout=300):
    return subprocess.run([str(BIN/args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=timeout)

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return synthetic_facades(tmp_path_factory.mktemp('cli')/'tiny', n_train=8, n_val=4, n_test=2, size=32)

def test_help():
    for cmd in ('pix2pix_train', 'pix2pix_demo'):
        r = run(cmd, '--help'); assert r.returncode == 0 and '--epochs' in r.stdout and '--out' in r.stdout, r.stderr
    assert '--precision' in run('pix2pix_train', '--help').stdout

@pytest.mark.parametrize('args,msg', [
    (['--precision', 'fp8'], "precision='fp8'"),
    (['--gan_loss', 'wgan'], "gan_loss='wgan'"),
    (['--epochs', '0'], 'epochs=0'),
    (['--preset', 'gpu'], "--preset 'gpu'"),
    (['--device', 'gpu7'], "device='gpu7'"),
    (['--resume', 'no/such/checkpoint.pt'], 'checkpoint not found: no/such/checkpoint.pt'),
])
def test_bad_options_fail_in_one_line(tiny, tmp_path, args, msg):
    r = run('pix2pix_train', '--source', tiny, '--out', tmp_path, '--size', 32, '--ngf', 8, '--ndf', 8, *args)
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('pix2pix_train: error:') and msg in last, last

def test_missing_source_names_the_folder(tmp_path):
    r = run('pix2pix_train', '--source', tmp_path/'nowhere', '--out', tmp_path/'o', '--size', 32)
    assert r.returncode != 0 and 'Traceback' not in r.stderr and 'nowhere' in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]

def test_tiny_run_then_resume(tiny, tmp_path):
    out = tmp_path/'run'
    common = ('--source', tiny, '--out', out, '--size', 32, '--bs', 4, '--ngf', 8, '--ndf', 8, '--n_layers', 2, '--num_workers', 0, '--save_every', 1)
    r = run('pix2pix_train', *common, '--epochs', 2, '--epochs_decay', 1)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ('config.json', 'checkpoint.pt', 'epoch_000.png', 'epoch_001.png', 'progression.png', 'losses.png', 'generator.safetensors', 'generator.json'):
        assert (out/f).is_file(), f
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['epochs'], cfg['epochs_decay'], cfg['size'], cfg['ngf']) == (2, 1, 32, 8)
    r = run('pix2pix_train', *common, '--epochs', 2, '--epochs_decay', 1, '--resume', 'last')
    assert r.returncode != 0 and 'nothing left to train' in r.stderr.strip().splitlines()[-1]
    r = run('pix2pix_train', *common, '--epochs', 3, '--epochs_decay', 1, '--resume', 'last')
    assert r.returncode != 0 and '2-epoch run' in r.stderr.strip().splitlines()[-1]
