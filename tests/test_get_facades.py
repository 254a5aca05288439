"`get_facades` against archives served over HTTP on 127.0.0.1 by the test itself (no internet needed)."
import io, tarfile, threading, hashlib, functools
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
import pytest
from PIL import Image
from pix2pix_nb.data import get_facades, safe_extract, find_pairs, DataError, UnsafeArchiveError

COUNTS = dict(train=3, val=2, test=1)

def _jpg(w=64, h=32):
    b = io.BytesIO(); Image.new('RGB', (w, h), (120, 30, 200)).save(b, 'JPEG'); return b.getvalue()

def _add(tf, name, data=b'', **kw):
    ti = tarfile.TarInfo(name); ti.size = len(data)
    for k, v in kw.items(): setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data) if data else None)

def make_archive(fn, extra=(), counts=COUNTS, top='facades'):
    "A facades-shaped .tar.gz; `extra` is a list of (name, data, TarInfo attributes) members"
    with tarfile.open(fn, 'w:gz') as tf:
        for s, n in counts.items():
            for i in range(n): _add(tf, f'{top}/{s}/{i + 1}.jpg', _jpg())
        for name, data, kw in extra: _add(tf, name, data, **kw)
    return fn

class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

@pytest.fixture
def serve(tmp_path):
    "Serve `tmp_path/www` on 127.0.0.1; yields (www folder, base url, request log)"
    www = tmp_path/'www'; www.mkdir()
    hits = []
    class H(_Quiet):
        def do_GET(self): hits.append(self.path); super().do_GET()
    srv = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(H, directory=str(www)))
    th = threading.Thread(target=srv.serve_forever, daemon=True); th.start()
    try: yield www, f'http://127.0.0.1:{srv.server_address[1]}', hits
    finally: srv.shutdown(); srv.server_close(); th.join(5)

def test_download_extract_cache(serve, tmp_path):
    www, base, hits = serve
    arch = make_archive(www/'facades.tar.gz')
    sha = hashlib.sha256(arch.read_bytes()).hexdigest()
    dest = tmp_path/'data'
    p = get_facades(dest, url=f'{base}/facades.tar.gz', sha256=sha, counts=COUNTS, show_progress=False)
    assert p == dest/'facades'
    assert sorted(d.name for d in p.iterdir()) == ['test', 'train', 'val']
    assert len(find_pairs(p)) == 6 and (dest/'archive'/'facades.tar.gz').is_file()
    assert not [q for q in dest.iterdir() if q.name.startswith('.extract')]   # temp folder cleaned
    assert get_facades(dest, url=f'{base}/facades.tar.gz', counts=COUNTS) == p
    assert len(hits) == 1                                                    # second call used the cache
    get_facades(dest, url=f'{base}/facades.tar.gz', counts=COUNTS, force=True, show_progress=False)
    assert len(hits) == 2

def test_wrong_hash_removes_archive(serve, tmp_path):
    www, base, _ = serve
    make_archive(www/'facades.tar.gz')
    with pytest.raises(DataError, match='SHA-256'):
        get_facades(tmp_path/'d', url=f'{base}/facades.tar.gz', sha256='ab' * 32, counts=COUNTS, show_progress=False)
    assert not (tmp_path/'d'/'archive'/'facades.tar.gz').exists() and not (tmp_path/'d'/'facades').exists()

def test_missing_url_and_incomplete(serve, tmp_path):
    www, base, _ = serve
    with pytest.raises(DataError, match='download failed'):
        get_facades(tmp_path/'d', url=f'{base}/nothing.tar.gz', show_progress=False)
    make_archive(www/'facades.tar.gz', counts=dict(train=3))                  # no val/ test/
    with pytest.raises(DataError, match='val holds 0 images, expected 2'):
        get_facades(tmp_path/'d', url=f'{base}/facades.tar.gz', counts=COUNTS, show_progress=False)
    assert not (tmp_path/'d'/'facades').exists()

def test_truncated_archive(serve, tmp_path):
    www, base, _ = serve
    data = make_archive(tmp_path/'full.tar.gz').read_bytes()
    (www/'facades.tar.gz').write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match='corrupt or unreadable archive'):
        get_facades(tmp_path/'d', url=f'{base}/facades.tar.gz', counts=COUNTS, show_progress=False)

@pytest.mark.parametrize('name,data,kw,msg', [
    ('../evil.txt', b'x', {}, "'../evil.txt'"),
    ('facades/../../evil.txt', b'x', {}, 'outside'),
    ('/tmp/evil_abs.txt', b'x', {}, "'/tmp/evil_abs.txt'"),
    ('facades/link', b'', dict(type=tarfile.SYMTYPE, linkname='../../../etc/passwd'), 'unsafe link'),
    ('facades/abslink', b'', dict(type=tarfile.SYMTYPE, linkname='/etc/passwd'), 'unsafe link'),
    ('facades/hard', b'', dict(type=tarfile.LNKTYPE, linkname='../outside'), 'unsafe link'),
    ('facades/dev', b'', dict(type=tarfile.CHRTYPE), 'devices'),
])
def test_malicious_archive(serve, tmp_path, name, data, kw, msg):
    www, base, _ = serve
    make_archive(www/'facades.tar.gz', extra=[(name, data, kw)])
    dest = tmp_path/'sandbox'/'d'
    with pytest.raises(UnsafeArchiveError, match=msg):
        get_facades(dest, url=f'{base}/facades.tar.gz', counts=COUNTS, show_progress=False)
    assert not (dest/'facades').exists()
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob('*') if 'www' not in p.parts}
    assert not [p for p in written if 'evil' in str(p)], written
    assert not Path('/tmp/evil_abs.txt').exists()

def test_safe_link_inside_is_allowed(tmp_path):
    arch = make_archive(tmp_path/'ok.tar.gz', extra=[('facades/train/alias.jpg', b'', dict(type=tarfile.SYMTYPE, linkname='1.jpg'))])
    out = safe_extract(arch, tmp_path/'x')
    assert (out/'facades'/'train'/'alias.jpg').is_symlink()
