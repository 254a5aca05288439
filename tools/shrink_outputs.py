"""Re-encode big PNG outputs stored in notebooks as JPEG (same picture, a fraction of the bytes).

    python tools/shrink_outputs.py nbs/03_training.ipynb [--min-kb 100] [--max-width 1000] [--quality 82]

Photos and GAN outputs compress badly as PNG: a progression sheet of facades is ~1.3 MB as PNG and
~100 KB as JPEG. Outputs under --min-kb are left alone (line art stays PNG). Run `nbdev_clean` after.
"""
import argparse, base64, io, json, sys
from pathlib import Path
from PIL import Image

def shrink(nb:dict, min_kb=100, max_width=1000, quality=82) -> int:
    n = 0
    for c in nb['cells']:
        for o in c.get('outputs', []):
            d = o.get('data', {})
            png = d.get('image/png')
            if not png or len(png) * 3 / 4 < min_kb * 1024: continue
            im = Image.open(io.BytesIO(base64.b64decode(png if isinstance(png, str) else ''.join(png)))).convert('RGB')
            if im.width > max_width: im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
            buf = io.BytesIO(); im.save(buf, format='JPEG', quality=quality, optimize=True)
            d.pop('image/png'); d['image/jpeg'] = base64.b64encode(buf.getvalue()).decode()
            o.setdefault('metadata', {}).pop('image/png', None)
            n += 1
    return n

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('notebooks', nargs='+'); p.add_argument('--min-kb', type=int, default=100)
    p.add_argument('--max-width', type=int, default=1000); p.add_argument('--quality', type=int, default=82)
    a = p.parse_args()
    for f in a.notebooks:
        path = Path(f)
        if not path.is_file(): sys.exit(f'shrink_outputs: notebook not found: {f}')
        nb = json.loads(path.read_text())
        k = shrink(nb, a.min_kb, a.max_width, a.quality)
        if k: path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
        print(f'{f}: {k} output(s) re-encoded')
