"pix2pix_nb.data: layouts and modes on disk, alignment through the full pipeline (also with worker processes), bad input, reproducibility."
import os, sys, subprocess, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from pix2pix_nb.data import (pix2pix_dls, pair_dl, synthetic_facades, synthetic_path, synthetic_triple, photo_to_sketch,
                             find_pairs, load_rgb, load_pair, denorm, to_pil, DataError, DataNotFoundError, CMP_CLASSES)

def noise(i, size=40):
    return np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)

def ab_folders(root, n=6, size=40, split=None):
    "A/ B/ folders where B is A with its channels reversed (an exact relation that any misalignment breaks)"
    a_dir, b_dir = (root/'A'/split, root/'B'/split) if split else (root/'A', root/'B')
    a_dir.mkdir(parents=True, exist_ok=True); b_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = noise(i, size)
        Image.fromarray(a).save(a_dir/f'{i}.png'); Image.fromarray(a[..., ::-1].copy()).save(b_dir/f'{i}.png')
    return root

def check_aligned(x, y):
    "Input and target batches still satisfy target = input with channels reversed"
    assert torch.equal(x.flip(1), y), (x.flip(1) - y).abs().max()

@pytest.mark.parametrize('nw', [0, 2])
def test_alignment_after_jitter_through_dataloader(tmp_path, nw):
    root = ab_folders(tmp_path, n=8, size=40)
    dls = pix2pix_dls(root, size=32, load_size=44, bs=4, num_workers=nw, valid_pct=0.25, device='cpu')
    seen = 0
    for _ in range(3):
        for x, y in dls.train: check_aligned(x, y); seen += len(x)
    assert seen == 3 * 4                    # 6 training pairs, drop_last with bs 4
    x, y = dls.valid.one_batch(); check_aligned(x, y)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1

def test_jitter_really_moves(tmp_path):
    "The check above could pass with no augmentation at all: make sure crops and flips vary"
    root = ab_folders(tmp_path, n=4, size=40)
    dls = pix2pix_dls(root, size=32, load_size=44, bs=1, num_workers=0, valid_pct=0.25, shuffle=False, device='cpu')
    outs = {tuple(dls.train.one_batch()[0].flatten()[:64].tolist()) for _ in range(12)}
    assert len(outs) > 6

def test_ab_layout_and_directions(tmp_path):
    for s, n in (('train', 5), ('val', 2), ('test', 3)):
        (tmp_path/s).mkdir()
        for i in range(n):
            a = noise(100 + i, 24); Image.fromarray(np.concatenate([a, 255 - a], 1)).save(tmp_path/s/f'{i}.png')
    dls = pix2pix_dls(tmp_path, size=24, load_size=24, flip=False, bs=2, num_workers=0, device='cpu')
    assert (len(dls.train_ds), len(dls.valid_ds)) == (5, 2)
    x, y = dls.valid.one_batch(); assert torch.allclose(x, -y, atol=1e-6)
    dl = pair_dl(tmp_path, size=24, bs=3, direction='BtoA', num_workers=0, device='cpu')
    x, y = next(iter(dl)); assert len(dl.dataset) == 3 and torch.allclose(x, -y, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(to_pil(y[0])), noise(100, 24))     # BtoA: target is A, file order kept

@pytest.mark.parametrize('mode', ['L', 'P', 'RGBA', 'I;16', 'LA', '1', 'CMYK'])
def test_any_mode_on_disk_becomes_rgb(tmp_path, mode):
    g = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    if mode == 'I;16': img = Image.fromarray(g.astype(np.uint16) * 257)
    elif mode == 'RGBA': img = Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)]), 'RGBA')
    else: img = Image.fromarray(g).convert(mode)
    fn = tmp_path/('x.tif' if mode == 'CMYK' else 'x.png'); img.save(fn)
    out = load_rgb(fn)
    assert out.mode == 'RGB' and out.size == (32, 32)
    if mode not in ('1', 'CMYK'): assert np.abs(np.asarray(out)[..., 1].astype(int) - g).max() <= 1, mode

def test_sixteen_bit_rgb_png_through_loader(tmp_path):
    "A 16-bit grey PNG in A/ and an 8-bit RGB in B/ load into the same batch"
    (tmp_path/'A').mkdir(); (tmp_path/'B').mkdir()
    for i in range(3):
        Image.fromarray((np.full((16, 16), 40000, np.uint16))).save(tmp_path/'A'/f'{i}.png')
        Image.fromarray(noise(i, 16)).save(tmp_path/'B'/f'{i}.jpg')
    x, y = pair_dl(tmp_path, size=16, bs=3, num_workers=0, device='cpu').one_batch()
    assert x.shape == y.shape == (3, 3, 16, 16)
    assert torch.allclose(denorm(x), torch.full_like(x, round(40000 / 257) / 255), atol=1e-4)

# ---------------------------------------------------------------- bad input: one clear line naming the culprit
def one_line(excinfo): return '\n' not in str(excinfo.value)

def test_missing_and_empty(tmp_path):
    with pytest.raises(DataNotFoundError, match='not_here') as e: pix2pix_dls(tmp_path/'not_here', size=16)
    assert one_line(e) and isinstance(e.value, FileNotFoundError)
    (tmp_path/'train').mkdir()
    with pytest.raises(DataNotFoundError, match='no images') as e: pix2pix_dls(tmp_path, size=16)
    assert one_line(e)

def test_non_image_file(tmp_path):
    d = synthetic_facades(tmp_path, n_train=4, n_val=1, n_test=0, size=16)
    (d/'train'/'0002.png').write_bytes(b'<html>not an image</html>')
    (d/'train'/'README.txt').write_text('ignored: not an image extension')
    with pytest.raises(DataError, match=r'0002\.png.*skip_bad=True') as e: pix2pix_dls(d, size=16, num_workers=0)
    assert one_line(e)
    with pytest.warns(UserWarning, match='0002.png'):
        dls = pix2pix_dls(d, size=16, num_workers=0, skip_bad=True)
    assert len(dls.train_ds) == 3

def test_truncated_file_named_when_decoded(tmp_path):
    d = synthetic_facades(tmp_path, n_train=3, n_val=1, n_test=0, size=32)
    fn = d/'train'/'0001.png'; fn.write_bytes(fn.read_bytes()[:200])          # header intact, pixels cut
    dls = pix2pix_dls(d, size=32, bs=1, num_workers=0, shuffle=False, device='cpu')
    with pytest.raises(DataError, match='0001.png') as e: [b for b in dls.train]
    assert one_line(e)

def test_ab_width_not_twice_height(tmp_path):
    d = synthetic_facades(tmp_path, n_train=3, n_val=1, n_test=0, size=16)
    Image.new('RGB', (40, 16)).save(d/'train'/'0001.png')
    with pytest.raises(DataError, match=r'0001\.png is 40x16: expected width = 2 x height') as e: pix2pix_dls(d, size=16)
    assert one_line(e)

def test_mismatched_names(tmp_path):
    root = ab_folders(tmp_path, n=4)
    (root/'B'/'3.png').rename(root/'B'/'three.png')
    with pytest.raises(DataError, match=r"A/B names do not match: 1 only in .*A \(e.g. \['3'\]\), 1 only in .*B \(e.g. \['three'\]\)") as e:
        pix2pix_dls(root, size=16)
    assert one_line(e)
    (root/'B'/'three.png').unlink()
    with pytest.raises(DataError, match='only in'): find_pairs(root)

def test_split_folders_of_a_b(tmp_path):
    for s, n in (('train', 4), ('val', 2)): ab_folders(tmp_path, n=n, split=s)
    dls = pix2pix_dls(tmp_path, size=16, bs=2, num_workers=0, device='cpu')
    assert (len(dls.train_ds), len(dls.valid_ds)) == (4, 2)

@pytest.mark.parametrize('kw,msg', [(dict(size=32, load_size=20), 'load_size=20 is smaller than the crop size=32'),
                                    (dict(size=0), 'size=0'), (dict(size=16, direction='btoa'), "direction='btoa'")])
def test_bad_settings(tmp_path, kw, msg):
    root = ab_folders(tmp_path, n=2)
    with pytest.raises(DataError, match=msg) as e: pix2pix_dls(root, **kw)
    assert one_line(e)

def test_bad_counts(tmp_path):
    with pytest.raises(DataError, match='n_val=-1'): synthetic_facades(tmp_path, n_val=-1, size=16)
    with pytest.raises(DataError, match='n_trian'): synthetic_path(size=16, n_trian=3)

# ---------------------------------------------------------------- synthetic set
GEN = "from pix2pix_nb.data import synthetic_facades; synthetic_facades({!r}, n_train=4, n_val=2, n_test=1, size=48, seed=3)"

def test_synthetic_byte_reproducible_across_processes(tmp_path):
    for k, hs in enumerate(('0', '12345')):
        subprocess.run([sys.executable, '-c', GEN.format(str(tmp_path/f'run{k}'))], check=True,
                       env={**os.environ, 'PYTHONHASHSEED': hs})
    files = sorted(p.relative_to(tmp_path/'run0') for p in (tmp_path/'run0').rglob('*.png'))
    assert len(files) == 14                       # 7 AB images + 7 label maps
    for f in files: assert (tmp_path/'run0'/f).read_bytes() == (tmp_path/'run1'/f).read_bytes(), f
    other = synthetic_facades(tmp_path/'seed4', n_train=1, n_val=0, n_test=0, size=48, seed=4)
    assert (other/'train'/'0000.png').read_bytes() != (tmp_path/'run0'/'train'/'0000.png').read_bytes()

def test_synthetic_contents():
    for i in range(20):
        sk, ph, lb = synthetic_triple(i, 'test', size=64)
        assert set(np.unique(np.asarray(sk))) <= {0, 255} and (np.asarray(sk) == 0).mean() > 0.03
        assert lb.mode == 'P' and np.asarray(lb).max() < len(CMP_CLASSES)
        assert np.asarray(ph).std() > 10                  # not a flat picture

def test_synthetic_path_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('PIX2PIX_NB_DATA', str(tmp_path))
    p = synthetic_path(size=16, n_train=3, n_val=1, n_test=1)
    assert p.parent == tmp_path and len(list((p/'train').iterdir())) == 3
    t = (p/'train'/'0000.png').stat().st_mtime_ns
    assert synthetic_path(size=16, n_train=3, n_val=1, n_test=1) == p
    assert (p/'train'/'0000.png').stat().st_mtime_ns == t            # reused, not regenerated
    assert [q.name for q in tmp_path.iterdir()] == [p.name]          # no temp folders left

# ---------------------------------------------------------------- real facades (skipped when absent)
def test_real_facades(facades):
    dls = pix2pix_dls(facades, size=64, bs=4, direction='BtoA', num_workers=0, device='cpu')
    x, y = dls.one_batch()
    assert x.shape == y.shape == (4, 3, 64, 64)
    assert len(dls.train_ds) + len(dls.valid_ds) == len(find_pairs(facades, ('train', 'val')))
    a, b = load_pair(find_pairs(facades, ('train',))[0])
    s = np.asarray(photo_to_sketch(a))
    assert set(np.unique(s)) == {0, 255} and 0.02 < (s == 0).mean() < 0.25

def test_non_image_in_a_b_folders(tmp_path):
    root = ab_folders(tmp_path, n=4)
    (root/'B'/'2.png').write_bytes(b'GIF89a but not really')
    with pytest.raises(DataError, match=r'B/2\.png') as e: pix2pix_dls(root, size=16, num_workers=0)
    assert one_line(e)
    with pytest.warns(UserWarning, match=r'2\.png'): assert len(find_pairs(root, skip_bad=True)) == 3

def test_sketch_dataset_from_paired_set(tmp_path):
    "The photo side of a paired set becomes B, its sketch A; splits and names are kept"
    from pix2pix_nb.data import sketch_dataset
    src = synthetic_facades(tmp_path/'src', n_train=3, n_val=1, n_test=0, size=48)
    out = sketch_dataset(src, tmp_path/'out', size=48, photo_side='B')
    pairs = find_pairs(out)
    assert sorted((p.split, p.a.name) for p in pairs) == [('train', '0000.png'), ('train', '0001.png'), ('train', '0002.png'), ('val', '0000.png')]
    a, b = load_pair(pairs[0])
    np.testing.assert_array_equal(np.asarray(b), np.asarray(load_pair(find_pairs(src)[0])[1]))
    assert set(np.unique(np.asarray(a))) == {0, 255}
    with pytest.raises(DataError, match="photo_side='C'"): sketch_dataset(src, tmp_path/'x', photo_side='C')
    with pytest.raises(DataNotFoundError, match='nope'): sketch_dataset(tmp_path/'nope', tmp_path/'x')

def png_header_only(fn, w, h):
    "A PNG whose header claims w x h grey pixels, with (almost) no pixel data: what a decompression bomb looks like before decoding"
    import struct, zlib
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    fn.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0))
                   + chunk(b'IDAT', zlib.compress(b'\x00' * (w + 1))) + chunk(b'IEND', b''))
    return fn

def test_truncated_file_skipped_when_decoded(tmp_path):
    "skip_bad also covers files whose header is fine but whose pixels are cut: the item is dropped, the epoch goes on."
    d = synthetic_facades(tmp_path, n_train=3, n_val=1, n_test=0, size=32)
    fn = d/'train'/'0001.png'; fn.write_bytes(fn.read_bytes()[:200])
    dls = pix2pix_dls(d, size=32, bs=1, num_workers=0, shuffle=False, device='cpu', skip_bad=True)
    with pytest.warns(UserWarning, match='skipping cannot read image .*0001.png'): batches = [b for b in dls.train]
    assert len(batches) == 2
    with pytest.warns(UserWarning, match='0001.png'): assert sum(len(a) for a, b in pair_dl(d, 'train', size=32, bs=2, num_workers=0, skip_bad=True)) == 2

@pytest.mark.parametrize('w, h, msg', [(20000, 20000, '400.0 Mpx, above the 89.5 Mpx limit'),   # above 2x PIL's limit: PIL's DecompressionBombError
                                       (10000, 9500, '10000x9500 = 95.0 Mpx, above'),            # PIL would only warn: refused too
                                       (20000, 2, None)])                                          # big but harmless (40 kpx)
def test_hostile_image_sizes_in_a_dataset(tmp_path, w, h, msg):
    "A decompression bomb in a dataset is refused by its header (nothing decoded), naming the file; skip_bad skips it."
    d = synthetic_facades(tmp_path, n_train=3, n_val=1, n_test=0, size=16)
    png_header_only(d/'train'/'0002.png', w, h)
    if msg is None:   # harmless size: only the AB shape check complains
        with pytest.raises(DataError, match='expected width = 2 x height'): pix2pix_dls(d, size=16, num_workers=0)
        return
    with pytest.raises(DataError, match=rf'0002\.png is {msg}.*skip_bad=True') as e: pix2pix_dls(d, size=16, num_workers=0)
    assert one_line(e)
    with pytest.raises(DataError, match=rf'0002\.png is {msg}') as e: load_rgb(d/'train'/'0002.png')
    with pytest.warns(UserWarning, match='0002.png'): dls = pix2pix_dls(d, size=16, num_workers=0, skip_bad=True)
    assert len(dls.train_ds) == 2

def test_zero_area_and_in_memory_images():
    with pytest.raises(DataError, match='no pixels'): load_rgb(Image.new('RGB', (0, 7)))
    with pytest.raises(DataError, match='no pixels'): load_rgb(Image.fromarray(np.zeros((5, 0, 3), np.uint8)))

def test_rotated_jpeg_is_read_upright(tmp_path):
    "EXIF Orientation 8 (rotate 90° counter-clockwise to view): every reader sees the displayed picture."
    from pix2pix_nb.data import image_size, photo_to_sketch
    im = Image.new('RGB', (60, 40), 'white'); im.paste((0, 0, 0), (0, 0, 60, 10))         # stored: black band on top
    ex = Image.Exif(); ex[0x0112] = 8
    im.save(tmp_path/'r.jpg', exif=ex, quality=95)
    up = load_rgb(tmp_path/'r.jpg')
    assert up.size == (40, 60) == image_size(tmp_path/'r.jpg')
    a = np.asarray(up.convert('L')).astype(int)
    assert a[30, :5].mean() < 60 and a[30, -5:].mean() > 200                                 # the top band is now on the left
    assert photo_to_sketch(tmp_path/'r.jpg').size == (40, 60)
