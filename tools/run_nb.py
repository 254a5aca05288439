"""Execute notebooks and store their outputs, as the docs site and readers see them.

    python tools/run_nb.py nbs/03_training.ipynb [more.ipynb ...] [--flags slow]

Cells run in the notebook's folder with execnb (what `nbdev_test` uses). Cells flagged `#| slow` or `#| cuda`
are skipped unless their flag is given, and keep the outputs stored from their last real run; `#| eval: false`
cells never run. Big PNG outputs are re-encoded as JPEG (tools/shrink_outputs.py). Run `nbdev_clean` after.
Stops at the first failing cell, leaving the notebook file unchanged.
"""
import argparse, os, re, sys, importlib.util
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

def _shrink():
    spec = importlib.util.spec_from_file_location('shrink_outputs', Path(__file__).parent/'shrink_outputs.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m.shrink

def directives(cell) -> dict:
    return {m.group(1): m.group(2).strip() for m in re.finditer(r'^#\|\s*([\w-]+):?(.*)$', cell.source, re.M)}

def run(path:Path, flags=()):
    nb = read_nb(path)
    skip_flags = {'slow', 'cuda'} - set(flags)
    def skip(cell):
        if cell.cell_type != 'code': return True
        d = directives(cell)
        return d.get('eval') == 'false' or bool(skip_flags & set(d))
    cwd = os.getcwd(); os.chdir(path.parent)
    try:
        sh = CaptureShell()
        # fastai's console progress bars would be stored as hundreds of redrawn lines: keep only the epoch table
        sh.run('import fastprogress.fastprogress as _fp; _fp.NO_BAR = True')
        for cell in nb.cells:
            if skip(cell): continue
            sh.cell(cell)
            if sh.exc: sys.exit(f'run_nb: {path.name}: cell failed: {type(sh.exc).__name__}: {str(sh.exc).splitlines()[0] if str(sh.exc) else ""}')
    finally: os.chdir(cwd)
    for cell in nb.cells:   # fastprogress prints one fill character per bar even when bars are off
        for o in cell.get('outputs', []):
            if o.get('output_type') == 'stream': o['text'] = re.sub(r'\r?█+\r?', '', ''.join(o['text']))
    n = _shrink()(nb)
    write_nb(nb, path)
    print(f'{path}: executed ({n} image(s) re-encoded as JPEG)')

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('notebooks', nargs='+'); p.add_argument('--flags', nargs='*', default=[])
    a = p.parse_args()
    for f in a.notebooks:
        if not Path(f).is_file(): sys.exit(f'run_nb: notebook not found: {f}')
        run(Path(f), a.flags)
