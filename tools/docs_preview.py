"""`make docs-preview`: render the docs site locally (Quarto can't run here) and test it in headless Chromium.

    python tools/docs_preview.py                 # process, execute where needed, render, browser-test
    python tools/docs_preview.py --browser-only  # re-test the pages already in _docs_preview/ (`make docs-browser-test`)

1. **Process** the notebooks the way `nbdev_proc_nbs` does (nbs/ -> _proc/: frontmatter, hidden and
   exported cells removed, `show_doc` cells executed, nbs/sidebar.yml and nbs/nbdev.yml refreshed),
   calling nbdev's own functions minus its Quarto installer.
2. **Execute** chapters stored without outputs. The site shows the outputs stored in the committed
   notebooks. A notebook whose visible code cells have no outputs at all is executed the way
   `nbdev_test` runs it (execnb, cells flagged `tst_flags` (`slow`, `cuda`) or `#| eval: false`
   skipped, `IN_TEST=1`), in its own process with a timeout (`--nb-timeout`), then processed by
   nbdev. Results are cached in _docs_preview/_exec/ until the notebook, settings.ini or the
   library changes.
   (`--execute always|never` overrides; the deploy workflow runs `--execute-in-place` so the
   published site shows the same outputs.)
3. **Render** every processed notebook to _docs_preview/NAME.html with nbconvert's lab template,
   honouring the Quarto cell options nbdev relies on (`echo`, `output`, `include`), turning
   `.ipynb` links into `.html`, with a sidebar in nbdev's order; assets (images/, styles.css) are
   copied. Static checks: error outputs, tracebacks, and widget outputs that would render as
   nothing (a widget needs its saved state, or a static image in the same or the next cell).
4. **Browser test**: Debian's chromium (headless, driven by chromedriver over its plain HTTP
   WebDriver API, fresh profile, pages served on 127.0.0.1; maths typeset offline by Debian's
   libjs-mathjax when installed) opens every page and fails on broken images
   (`naturalWidth == 0`), error outputs or links to pages that don't exist; screenshots of the
   home page and the training chapter (top, and its epoch grid) go to _docs_preview/screenshots/.
   Notes (never failures) flag chapters missing the book's conventions: a one-line `> description`,
   an introduction before the code, pictures, a closing summary.
"""
import argparse, base64, copy, json, os, re, shutil, socket, subprocess, sys, tempfile, threading, time
import urllib.error, urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, PROC, OUT = ROOT/'nbs', ROOT/'_proc', ROOT/'_docs_preview'
WIDGET_MIME = 'application/vnd.jupyter.widget-view+json'
WSTATE_MIME = 'application/vnd.jupyter.widget-state+json'
IMG_MIMES = ('image/png', 'image/jpeg', 'image/gif', 'image/svg+xml')
CHROME_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
               '--no-first-run', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
               '--hide-scrollbars', '--force-device-scale-factor=1']
LOCAL_MATHJAX = Path('/usr/share/javascript/mathjax')
MATHJAX_CDN = 'https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.7/latest.js?config=TeX-AMS_CHTML-full,Safe'
SHOTS = {'index': 'home', '03_training': 'training'}   # page stem -> screenshot name
GRID_TAG = 'preview-epoch-grid'   # cell tag: widgets, their static pictures, cells whose last line shows a grid/progression
_re_grid_src = re.compile(r'EpochGrid|progression|epoch_\d|epoch.?grid|\bgrids?\b', re.I)
HIDE_DIRS = {'hide', 'export', 'exporti', 'default_exp'}

NOTES = []   # soft findings, printed at the end

class PreviewError(Exception): "A docs-preview step failed; the message says which page/cell and why"

def log(*a): print('docs-preview:', *a, flush=True)

# ---------------------------------------------------------------- notebook helpers (pure, unit-tested)
_re_directive = re.compile(r'^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')

def src_of(cell): s = cell.get('source', ''); return s if isinstance(s, str) else ''.join(s)
def text_of(x): return x if isinstance(x, str) else ''.join(x or [])

def directives(source):
    "Leading `#| key: value` lines of a cell as a dict (`#| flag` -> True)"
    d = {}
    for line in source.splitlines():
        m = _re_directive.match(line)
        if not m: break
        d[m.group(1).lower()] = m.group(2).lower() or True
    return d

def strip_directives(source):
    lines = source.splitlines()
    while lines and _re_directive.match(lines[0]): lines.pop(0)
    return '\n'.join(lines).strip('\n')

def runs_visibly(cell, skip_flags=('slow', 'cuda')):
    "Would `nbdev_test` run this code cell, and would its output show on the site?"
    if cell.get('cell_type') != 'code' or not strip_directives(src_of(cell)).strip(): return False
    d = directives(src_of(cell))
    if d.keys() & HIDE_DIRS or d.keys() & set(skip_flags): return False
    return d.get('eval') != 'false' and d.get('include') != 'false' and d.get('output') != 'false'

def needs_execution(nb, skip_flags=('slow', 'cuda')):
    "True when `nb` was stored without outputs although some visible cell would produce them"
    code = [c for c in nb.get('cells', []) if c.get('cell_type') == 'code']
    if any(c.get('outputs') for c in code): return False
    return any(runs_visibly(c, skip_flags) for c in code)

def _has_image(cell):
    for o in cell.get('outputs', []):
        data = o.get('data', {})
        if any(m in data for m in IMG_MIMES) or '<img' in text_of(data.get('text/html', '')): return True
    return False

def widget_state(nb):
    return ((nb.get('metadata', {}).get('widgets') or {}).get(WSTATE_MIME) or {}).get('state') or {}

def output_problems(nb, name):
    "Error outputs, tracebacks and widgets that would show as nothing, as one-line messages"
    probs, cells = [], nb.get('cells', [])
    state = widget_state(nb)
    for i, c in enumerate(cells):
        if c.get('cell_type') != 'code': continue
        first = strip_directives(src_of(c)).split('\n')[0][:60]
        where = f'{name}: cell {i} (`{first}`)'
        for o in c.get('outputs', []):
            ot = o.get('output_type')
            if ot == 'error':
                probs.append(f"{where} raised {o.get('ename')}: {text_of(o.get('evalue'))[:120]}")
            elif ot == 'stream' and 'Traceback (most recent call last)' in text_of(o.get('text')):
                probs.append(f'{where} printed a traceback')
            elif ot in ('execute_result', 'display_data'):
                data = o.get('data', {})
                if 'Traceback (most recent call last)' in text_of(data.get('text/plain', '')):
                    probs.append(f'{where} shows a traceback')
                if WIDGET_MIME in data:
                    mid = (data[WIDGET_MIME] or {}).get('model_id')
                    nxt = next((x for x in cells[i+1:] if x.get('cell_type') == 'code' and x.get('outputs')), {})
                    if mid not in state and not (_has_image(c) or _has_image(nxt)):
                        probs.append(f'{where} shows a widget with no saved state and no static image beside it '
                                     '(it would render as nothing on the site)')
    return probs

_re_summary = re.compile(r'^#{2,3}\s.*(summary|recap|takeaway|what we (built|learned|did)|wrap.?up|conclusion)', re.I | re.M)
def structure_notes(src_nb, shown_nb, name):
    "Soft checks of the book's chapter conventions (printed as notes, never failures)"
    notes, cells = [], src_nb.get('cells', [])
    mds = [src_of(c) for c in cells if c.get('cell_type') == 'markdown']
    if not mds or not mds[0].lstrip().startswith('# '):
        return [f'{name}: does not start with a `# Title` markdown cell']
    quote = [l for l in mds[0].splitlines() if l.startswith('>')]
    if not quote: notes.append(f'{name}: no `> description` line under the title (the page subtitle)')
    elif len(quote) > 1: notes.append(f'{name}: the `> description` spans {len(quote)} lines; nbdev keeps only the first')
    first_code = next((i for i, c in enumerate(cells) if runs_visibly(c)), len(cells))
    if sum(1 for c in cells[1:first_code] if c.get('cell_type') == 'markdown') == 0:
        notes.append(f'{name}: no introduction (what it teaches and why) before the first visible code cell')
    pics = sum(_has_image(c) for c in shown_nb.get('cells', [])) + sum('![' in m or '<img' in m for m in mds)
    if not pics: notes.append(f'{name}: no pictures (figures or images) on the page')
    if not _re_summary.search('\n'.join(mds[-3:])): notes.append(f'{name}: no closing summary section (e.g. `## Summary`) near the end')
    return notes

def grid_cells(nb):
    "Indices of cells showing a widget (plus the cell holding its static picture) or an epoch grid picture"
    cells, res = nb.get('cells', []), []
    for i, c in enumerate(cells):
        last = [l for l in strip_directives(src_of(c)).splitlines() if l.strip() and not l.lstrip().startswith('#')][-1:]
        if c.get('cell_type') == 'code' and _has_image(c) and last and _re_grid_src.search(last[0]): res.append(i)  # what it shows
        if c.get('cell_type') == 'code' and any(WIDGET_MIME in o.get('data', {}) for o in c.get('outputs', [])):
            res.append(i)
            if not _has_image(c):
                j = next((j for j in range(i+1, len(cells)) if cells[j].get('cell_type') == 'code'
                          and cells[j].get('outputs')), None)
                if j is not None and _has_image(cells[j]): res.append(j)
    return res

def _esc(x): import html; return html.escape(str(x))

def widget_html(model_id, state, depth=0):
    "Static HTML for a widget from its saved state (boxes, images, labels, HTML, outputs), '' if unknown"
    m = state.get(model_id)
    if not m or depth > 30: return ''
    name, st = m.get('model_name', ''), m.get('state', {})
    bufs = {'.'.join(map(str, b.get('path', []))): b.get('data', '') for b in m.get('buffers', [])}
    kids = ''.join(widget_html(k[len('IPY_MODEL_'):], state, depth+1) for k in st.get('children', [])
                   if isinstance(k, str) and k.startswith('IPY_MODEL_'))
    if name in ('HBoxModel', 'BoxModel', 'GridBoxModel'):
        return f'<div style="display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start">{kids}</div>'
    if name in ('VBoxModel', 'AccordionModel', 'TabModel', 'StackModel'):
        return f'<div style="display:flex;flex-direction:column;gap:4px">{kids}</div>'
    if name == 'ImageModel' and bufs.get('value'):
        fmt = {'svg': 'svg+xml'}.get(st.get('format', 'png'), st.get('format', 'png'))
        w = f' width="{_esc(st["width"])}"' if st.get('width') else ''
        return f'<img src="data:image/{fmt};base64,{bufs["value"]}"{w}>'
    if name in ('LabelModel', 'HTMLModel', 'HTMLMathModel'):
        v = st.get('value', '')
        return f'<div>{v if name != "LabelModel" else _esc(v)}</div>'
    if name == 'OutputModel':
        parts = []
        for o in st.get('outputs', []):
            d = o.get('data', {})
            img = next((k for k in IMG_MIMES if k in d and k != 'image/svg+xml'), None)
            if img: parts.append(f'<img src="data:{img};base64,{text_of(d[img]).strip()}">')
            elif 'text/html' in d: parts.append(text_of(d['text/html']))
            elif 'image/svg+xml' in d: parts.append(text_of(d['image/svg+xml']))
            elif o.get('output_type') == 'stream' or 'text/plain' in d:
                parts.append(f'<pre>{_esc(text_of(o.get("text") or d.get("text/plain")))}</pre>')
        return f'<div>{"".join(parts)}</div>'
    return kids

_re_ipynb_link = re.compile(r'(\]\(|href=")((?![a-z][a-z0-9+.-]*:)[^)"\s#]+)\.ipynb(#[^)"\s]*)?')
def html_links(md, pages=None):
    "Point links to notebooks at their pages, as Quarto does (`pages`: notebook stem -> html file name)"
    def _f(m):
        stem = m.group(2).rsplit('/', 1)
        page = (pages or {}).get(stem[-1], stem[-1] + '.html')
        return m.group(1) + '/'.join(stem[:-1] + [page]) + (m.group(3) or '')
    return _re_ipynb_link.sub(_f, md)

_re_attr_link = re.compile(r'\[([^\]\n]+)\]\(([^)\s]+)\)\{([^}\n]*)\}')
_re_head_attr = re.compile(r'^(#{1,6} .*?)\s*\{[#.][^}\n]*\}\s*$', re.M)
_re_fence_div = re.compile(r'^:::+\s*(\{[^}\n]*\}|[\w-]+)?\s*$', re.M)
def quarto_md(md):
    "Pandoc/Quarto markdown that nbconvert's renderer lacks: `[a](u){attrs}` links, `{#id}` headings, `:::` divs"
    md = _re_attr_link.sub(lambda m: f'<a href="{m.group(2)}" {m.group(3)}>{m.group(1)}</a>', md)
    md = _re_head_attr.sub(r'\1', md)
    def _div(m):
        cls = re.findall(r'\.([\w-]+)', m.group(1) or '') or ([m.group(1)] if m.group(1) else [])
        return f'\n<div class="{" ".join(["quarto-div"] + cls)}">\n' if m.group(1) else '\n</div>\n'
    return _re_fence_div.sub(_div, md)

def output_file(nb, stem):
    "The page nbdev/Quarto write for notebook `stem`: the frontmatter's `output-file`, else STEM.html"
    for c in nb.get('cells', [])[:3]:
        fm = frontmatter(src_of(c)) if c.get('cell_type') == 'raw' else None
        if fm and fm.get('output-file'): return str(fm['output-file'])
    return stem + '.html'

def frontmatter(src):
    "YAML frontmatter of a raw cell (`---` ... `---`) as a dict, or None"
    s = src.strip()
    if not (s.startswith('---') and s.count('---') >= 2): return None
    import yaml
    try: d = yaml.safe_load(s.split('---')[1])
    except yaml.YAMLError: return None
    return d if isinstance(d, dict) else None

def preview_nb(nb, pages=None):
    "A copy of processed notebook `nb` ready for nbconvert: Quarto cell options applied, links fixed"
    nb, cells = copy.deepcopy(nb), []
    wcells, wstate = set(grid_cells(nb)), widget_state(nb)
    nb.get('metadata', {}).pop('widgets', None)
    title = None
    for i, c in enumerate(nb.get('cells', [])):
        src, tags = src_of(c), []
        if c.get('cell_type') == 'raw':
            fm = frontmatter(src)
            if fm is None: continue
            title = fm.get('title')
            md = (f"# {fm['title']}\n\n" if fm.get('title') else '') + \
                 (f"<p class=\"description\">{fm['description']}</p>" if fm.get('description') else '')
            if md: cells.append({'cell_type': 'markdown', 'id': f'cell-{i}', 'metadata': {}, 'source': md})
            continue
        if c.get('cell_type') == 'markdown':
            c['source'] = quarto_md(html_links(src, pages))
        elif c.get('cell_type') == 'code':
            d = directives(src)
            if d.get('include') == 'false' or d.keys() & HIDE_DIRS: continue
            c['source'] = strip_directives(src)
            if d.get('echo') == 'false' or not c['source'].strip(): tags.append('remove_input')
            if d.get('output') == 'false': c['outputs'] = []
            if not c['source'].strip() and not c.get('outputs'): continue
            for o in c.get('outputs', []):
                w = o.get('data', {}).get(WIDGET_MIME)
                if w:   # offline there is no widget JavaScript: show what the saved state would display
                    h = widget_html((w or {}).get('model_id'), wstate)
                    o['data'] = {'text/html': f'<div class="preview-widget-static">{h}</div>'} if h else {}
                if 'text/markdown' in o.get('data', {}): o['data']['text/markdown'] = quarto_md(html_links(text_of(o['data']['text/markdown']), pages))
            c['execution_count'] = None
        if i in wcells: tags.append(GRID_TAG)
        c.setdefault('metadata', {})['tags'] = tags
        c['id'] = c.get('id') or f'cell-{i}'
        cells.append(c)
    nb['cells'] = cells
    return nb, title

# ---------------------------------------------------------------- 1. process, 2. execute
def import_cells(nb, skip_flags=('slow', 'cuda')):
    """Cells nbdev runs when it builds the docs although they are more than imports, as (index, flagged).
    nbdev's docs processor runs every cell that contains an import (ignoring `slow`/`cuda` flags), plus
    exported and show_doc cells, without the cells in between."""
    import ast
    res = []
    for i, c in enumerate(nb.get('cells', [])):
        if c.get('cell_type') != 'code': continue
        d = directives(src_of(c))
        if d.get('eval') == 'false' or d.keys() & {'export', 'exports', 'exporti'}: continue
        try: tree = ast.parse('\n'.join(l for l in src_of(c).splitlines() if not l.lstrip().startswith(('%', '!'))))
        except SyntaxError: continue
        has_imp = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
        other = any(not isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)
        if has_imp and other: res.append((i, bool(d.keys() & set(skip_flags))))
    return res

def process_nbs(n_workers=2, force=False):
    """What `nbdev_proc_nbs` does (nbdev.serve.proc_nbs, same cache rules) without its Quarto installer, and
    one notebook at a time: a chapter that nbdev can't process is reported and the others still render.
    Returns a list of problems."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing, nbdev.serve, nbdev.serve_drv
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import _proc_file
    cfg = get_config()
    refresh_quarto_yml()
    nbdev_sidebar.__wrapped__(path=NBS)
    files = nbglob(NBS, func=Path, file_glob='', file_re='')
    files += [NBS/f for f in ('_quarto.yml', '_brand.yml') if (NBS/f).exists()]
    chk_mtime = max(cfg.config_file.stat().st_mtime, Path(nbdev.serve.__file__).stat().st_mtime)
    PROC.mkdir(parents=True, exist_ok=True)
    if force or PROC.stat().st_mtime < chk_mtime: shutil.rmtree(PROC); PROC.mkdir()
    problems, skip = [], set()
    for f in files:   # heavy cells nbdev would run while building the docs: report, don't run them here
        if f.suffix != '.ipynb': continue
        flagged = [i for i, fl in import_cells(json.loads(f.read_text(encoding='utf-8')), get_flags()) if fl]
        if flagged:
            skip.add(f); (PROC/f.relative_to(NBS)).unlink(missing_ok=True)
            problems.append(f"{f.name}: cell(s) {', '.join(map(str, flagged))} are flagged {'/'.join(get_flags())} but contain an "
                            "import: nbdev runs every cell with an import when it builds the docs (flags ignored), so the site "
                            "build would run them; move the imports to the notebook's import cell (not processed further)")
    for f in files:
        if f.suffix == '.ipynb' and f not in skip:
            for i, _ in import_cells(json.loads(f.read_text(encoding='utf-8')), get_flags()):
                NOTES.append(f'{f.name}: cell {i} mixes imports with other code; nbdev runs it on its own when it builds '
                             'the docs (keep imports in import-only cells)')
    items = [o for o in (_proc_file(f, cache=PROC, path=NBS, mtime=PROC.stat().st_mtime) for f in files if f not in skip) if o]
    with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context('spawn')) as ex:
        futs = [(item, ex.submit(nbdev.serve_drv.main, item)) for item in items]
        for (src, dst, _), fut in futs:
            try: fut.result()
            except Exception as e:   # nbdev runs imports, exported cells and show_doc cells; one of them raised
                Path(dst).unlink(missing_ok=True)   # no stale page from an older version
                cause = str(e.__cause__ or '')
                errs = [l.strip() for l in cause.splitlines() if re.match(r'^\w+(Error|Exception|Interrupt)\b', l.strip())]
                cell = str(e).strip().split('\n')
                problems.append(f"{Path(src).name}: nbdev could not process it: {cell[0].split(' in notebook: ')[-1]} "
                                f"`{cell[1] if len(cell) > 1 else ''}`" + (f' -> {errs[-1]}' if errs else '')
                                + ('  (to build the docs nbdev runs only imports, exported and show_doc cells: a cell'
                                   ' that mixes an import with other code runs without the cells before it)'
                                   if errs and errs[-1].startswith('NameError') else ''))
    PROC.touch()
    return problems

def get_flags():
    from nbdev.config import get_config
    return tuple(get_config().get('tst_flags', '').split())

def page_order():
    "Processed notebooks in the sidebar's order (nbdev: index first, then by file name)"
    import yaml
    found = sorted((p for p in PROC.rglob('*.ipynb') if (NBS/p.relative_to(PROC)).exists()),   # not stale copies
                   key=lambda p: (p.name != 'index.ipynb', str(p)))
    try: side = yaml.safe_load((NBS/'sidebar.yml').read_text())['website']['sidebar']['contents']
    except Exception: return found
    flat = []
    def walk(xs):
        for x in xs:
            if isinstance(x, str): flat.append(x)
            elif isinstance(x, dict): walk(x.get('contents', [])); flat.append(x.get('href', ''))
    walk(side)
    rank = {f: i for i, f in enumerate(flat) if f}
    return sorted(found, key=lambda p: (rank.get(p.relative_to(PROC).as_posix(), len(rank)), str(p)))

def exec_one(src, dst, skip_flags):
    "Child process: run `src` like nbdev_test, keep its outputs, process it like nbdev, write `dst`"
    os.environ['IN_TEST'] = '1'
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults
    src, dst, flags = Path(src), Path(dst), set(skip_flags)
    run = NBProcessor(src, procs=FrontmatterProc, process=True).nb
    def _no_eval(cell):   # the same rule as nbdev.test.test_nb
        if cell.cell_type != 'code' or 'nbdev_export'+'(' in cell.source: return True
        direc = getattr(cell, 'directives_', {}) or {}
        if direc.get('eval:', [''])[0].lower() == 'false': return True
        return flags & direc.keys()
    k = CaptureShell(src)
    try:
        with working_directory(src.parent): k.run_all(run, exc_stop=True, preproc=_no_eval)
    except Exception:
        sys.stderr.write(k.prettytb(fname=src) + '\n')
        sys.exit(f'{src.name}: a cell raised while executing it for the docs (traceback above; `nbdev_test --path {src}` shows the same)')
    nb = read_nb(src)
    for c in run.cells:
        if c.cell_type == 'code' and getattr(c, 'idx_', None) is not None and c.get('outputs'):
            nb.cells[c.idx_].outputs = c.outputs
    FilterDefaults()(nb)   # its exec_show_docs step also saves the state of every widget created above
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)

def execute_where_needed(pages, mode='auto', timeout=600, skip_flags=('slow', 'cuda')):
    "Return ({processed page: notebook to render}, problems), executing chapters stored without outputs per `mode`"
    from nbdev.config import get_config
    res, exec_dir, problems = {}, OUT/'_exec', []
    for p in pages:
        rel = p.relative_to(PROC)
        src = NBS/rel
        res[p] = p
        if mode == 'never' or not src.exists(): continue
        nb = json.loads(src.read_text(encoding='utf-8'))
        if mode == 'auto' and not needs_execution(nb, skip_flags): continue
        dst = exec_dir/rel
        deps = [src, ROOT/'settings.ini', *(ROOT/get_config().lib_name).glob('*.py')]
        if dst.exists() and dst.stat().st_mtime >= max(f.stat().st_mtime for f in deps):
            log(f'{rel}: stored without outputs; using cached execution'); res[p] = dst; continue
        log(f'{rel}: stored without outputs; executing it (timeout {timeout}s)...')
        t = time.time()
        cmd = [sys.executable, __file__, '--exec-one', str(src), str(dst), '--flags', *skip_flags]
        try: r = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            problems.append(f'{rel}: executing it took over {timeout}s (--nb-timeout)'); continue
        if r.returncode:   # report, render the page without outputs, and go on with the others
            sys.stderr.write(r.stderr[-6000:])
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f'exit status {r.returncode}'
            problems.append(last if last.startswith(str(rel)) else f'{rel}: executing it failed: {last}')
            continue
        log(f'{rel}: executed in {time.time()-t:.0f}s')
        res[p] = dst
    return res, problems

def execute_in_place(timeout=600, skip_flags=('slow', 'cuda')):
    "For CI before `nbdev_docs`: give chapters stored without outputs their outputs, in nbs/ itself"
    from execnb.nbio import read_nb, write_nb
    for src in sorted(NBS.rglob('*.ipynb')):
        if any(part.startswith(('.', '_')) for part in src.relative_to(NBS).parts): continue
        if not needs_execution(json.loads(src.read_text(encoding='utf-8')), skip_flags): continue
        log(f'{src.name}: stored without outputs; executing it in place')
        tmp = OUT/'_inplace'/src.name
        try: r = subprocess.run([sys.executable, __file__, '--exec-one', str(src), str(tmp), '--flags', *skip_flags,
                                 '--raw'], cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired: raise PreviewError(f'{src.name}: executing it took over {timeout}s (--nb-timeout)') from None
        if r.returncode: raise PreviewError(f'{src.name}: a cell raised while executing it (traceback above)')
        nb, out = read_nb(src), read_nb(tmp)
        for c, o in zip(nb.cells, out.cells):
            if c.cell_type == 'code': c.outputs = o.get('outputs', [])
        nb.metadata.update({k: v for k, v in out.metadata.items() if k == 'widgets'})
        write_nb(nb, src)

# ---------------------------------------------------------------- 3. render
NAV_CSS = """<style>
body { margin-left: 15rem !important; position: relative; }
nav.preview-side { position: absolute; top: 0; bottom: 0; left: -15rem; width: 14rem; overflow: hidden; padding: 1rem;
  background: #f7f7f9; border-right: 1px solid #ddd; font: 14px/1.5 system-ui, sans-serif; }
nav.preview-side a { display: block; color: #2780e3; text-decoration: none; padding: .15rem 0; }
nav.preview-side a.active { font-weight: 600; color: #222; }
nav.preview-side .site { font-weight: 700; font-size: 16px; margin-bottom: .5rem; }
nav.preview-side .preview-banner { font-size: 11px; color: #888; margin-top: 1rem; }
.jp-RenderedMarkdown pre { background: #f7f7f9; padding: .6rem .8rem; border-radius: 4px; }
.quarto-div { border-left: 4px solid #2780e3; background: #f3f8fd; padding: .3rem .9rem; margin: .8rem 0; }
p.description { font-style: italic; font-size: 135%; opacity: 70%; }
</style>"""

def render(sources, title='pix2pix_nb'):
    "Render processed notebooks {page: file} to OUT/*.html; return [(page stem, html path, problems)]"
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    cfg = Config()
    cfg.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    cfg.TagRemovePreprocessor.enabled = True
    cfg.HTMLExporter.preprocessors = ['nbconvert.preprocessors.TagRemovePreprocessor']
    exporter = HTMLExporter(config=cfg, template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True,
                            mathjax_url='@MATHJAX@')
    mathjax = LOCAL_MATHJAX if (LOCAL_MATHJAX/'MathJax.js').exists() else None   # Debian's libjs-mathjax: maths offline
    link = OUT/'_mathjax'
    if mathjax and not (link.is_symlink() or link.exists()): OUT.mkdir(parents=True, exist_ok=True); link.symlink_to(mathjax)
    for f in PROC.rglob('*'):   # assets: images, styles.css, ... (everything nbdev copied that isn't a page)
        if f.is_file() and f.suffix != '.ipynb' and f.suffix not in ('.yml', '.yaml'):
            d = OUT/f.relative_to(PROC); d.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, d)
    nbs = {page: json.loads(Path(f).read_text(encoding='utf-8')) for page, f in sources.items()}
    names = {page.stem: output_file(nb, page.stem) for page, nb in nbs.items()}
    pages, titles = [], {}
    for page, nb in nbs.items():
        rel = page.relative_to(PROC).parent/names[page.stem]
        probs = output_problems(nb, page.relative_to(PROC).as_posix())
        src = NBS/page.relative_to(PROC)
        if page.stem != 'index' and src.exists():
            NOTES.extend(structure_notes(json.loads(src.read_text(encoding='utf-8')), nb, src.name))
        pnb, t = preview_nb(nb, names)
        titles[rel] = t or page.stem
        pages.append((page, rel, pnb, probs))
    res = []
    for page, rel, pnb, probs in pages:
        node = nbformat.from_dict(pnb)
        from nbformat.v4.rwbase import rejoin_lines
        node = rejoin_lines(node)   # multi-line strings stored as lists (the on-disk format) -> one string, as nbformat.reads does
        body, _ = exporter.from_notebook_node(node, resources={'metadata': {'name': titles[rel], 'path': str(page.parent)}})
        up = '../' * (len(rel.parts) - 1)
        nav = ''.join(f'<a href="{up}{r.as_posix()}"{" class=active" if r == rel else ""}>{titles[r]}</a>' for r in titles)
        side = (f'<nav class="preview-side"><div class="site">{title}</div>{nav}'
                '<div class="preview-banner">Local preview (tools/docs_preview.py) of the Quarto site that CI builds.</div></nav>')
        css = f'<link rel="stylesheet" href="{up}styles.css">' if (OUT/'styles.css').exists() else ''
        body = body.replace('</head>', f'{css}{NAV_CSS}</head>', 1)
        body = body.replace('@MATHJAX@', f'{up}_mathjax/MathJax.js?config=TeX-AMS_CHTML-full,Safe' if mathjax else MATHJAX_CDN)
        body = re.sub(r'(<body[^>]*>)', lambda m: m.group(1) + side, body, count=1)
        dest = OUT/rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(body, encoding='utf-8')
        res.append((page.stem, dest, probs))
    return res

# ---------------------------------------------------------------- 4. browser test
def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def find_chromium():
    for b in ('chromium', 'chromium-browser'):
        if shutil.which(b): binary = shutil.which(b); break
    else: raise PreviewError('chromium not found: run `make docs-preview` (it installs Debian\'s chromium and chromium-driver)')
    driver = shutil.which('chromedriver') or ('/usr/bin/chromedriver' if Path('/usr/bin/chromedriver').exists() else None)
    if not driver: raise PreviewError('chromedriver not found: apt-get install chromium-driver (`make docs-preview` does it)')
    return binary, driver

class Chrome:
    "Just enough of the W3C WebDriver protocol, over HTTP to a local chromedriver (no extra packages)"
    def __init__(self, binary, driver, width=1280, height=1000):
        self.profile = tempfile.mkdtemp(prefix='docs-preview-chromium-')
        self.port, self.size = free_port(), (width, height)
        self.proc = subprocess.Popen([driver, f'--port={self.port}'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.sid = None
        for _ in range(100):
            try:
                if self._req('GET', '/status', sid=False)['value'].get('ready'): break
            except (OSError, PreviewError): pass
            time.sleep(0.1)
        else: self.close(); raise PreviewError('chromedriver did not start')
        opts = {'binary': binary, 'args': CHROME_ARGS + [f'--user-data-dir={self.profile}', f'--window-size={width},{height}']}
        caps = {'capabilities': {'alwaysMatch': {'browserName': 'chrome', 'goog:chromeOptions': opts,
                                                 'goog:loggingPrefs': {'browser': 'SEVERE'},
                                                 'timeouts': {'pageLoad': 60000, 'script': 30000}}}}
        try: self.sid = self._req('POST', '/session', caps, sid=False)['value']['sessionId']
        except Exception: self.close(); raise

    def _req(self, method, path, body=None, sid=True):
        url = f'http://127.0.0.1:{self.port}' + (f'/session/{self.sid}' if sid else '') + path
        data = json.dumps(body).encode() if body is not None else (b'{}' if method == 'POST' else None)
        rq = urllib.request.Request(url, data=data, method=method, headers={'Content-Type': 'application/json'})
        try:
            with urllib.request.urlopen(rq, timeout=120) as r: return json.loads(r.read() or b'{}')
        except urllib.error.HTTPError as e:
            try: msg = json.loads(e.read())['value']['message'].split('\n')[0]
            except Exception: msg = str(e)
            raise PreviewError(f'webdriver {method} {path}: {msg}') from None

    def get(self, url): self._req('POST', '/url', {'url': url})
    def js(self, script, *args): return self._req('POST', '/execute/sync', {'script': script, 'args': list(args)})['value']
    def cdp(self, cmd, **params): return self._req('POST', '/goog/cdp/execute', {'cmd': cmd, 'params': params})['value']
    def console_errors(self):
        try: return [e['message'] for e in self._req('POST', '/se/log', {'type': 'browser'})['value'] if e.get('level') == 'SEVERE']
        except PreviewError: return []

    def shot(self, path, y=0, height=None, max_height=5000):
        "PNG of the page from `y` down (`height`, default the rest of the page up to `max_height`)"
        w = self.js('return document.documentElement.scrollWidth')
        total = self.js('return document.documentElement.scrollHeight')
        h = min(height or total - y, max_height, max(total - y, 1))
        r = self.cdp('Page.captureScreenshot', format='png', captureBeyondViewport=True,
                     clip={'x': 0, 'y': y, 'width': w, 'height': h, 'scale': 1})
        Path(path).write_bytes(base64.b64decode(r['data']))
        return path

    def close(self):
        if self.sid:
            try: self._req('DELETE', '')
            except Exception: pass
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

PAGE_CHECK = r"""return (async () => {
const imgs = [...document.images];
const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => (i.getAttribute('src') || '').slice(0, 100));
const errs = [...document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]')]
  .filter(e => /Traceback \(most recent call last\)|^\w+(Error|Exception)\b.*$/m.test(e.innerText) && /Traceback|Error:/.test(e.innerText))
  .map(e => e.innerText.trim().split('\n').slice(-1)[0].slice(0, 160));
const grids = [...document.querySelectorAll('.celltag_preview-epoch-grid')];
const grid = grids.find(g => g.querySelector('img')) || grids[0];   // the first one that shows a picture
const links = [...new Set([...document.querySelectorAll('a[href]')].map(a => a.href.split('#')[0])
  .filter(u => u.startsWith(location.origin) && u !== location.href.split('#')[0]))];
const dead = (await Promise.all(links.map(u => fetch(u, {method: 'HEAD'}).then(r => r.ok ? null : u).catch(() => u))))
  .filter(u => u).map(u => u.slice(location.origin.length + 1));
return {title: document.title, n_img: imgs.length, broken: broken, errs: errs, dead: dead, n_links: links.length, height: document.documentElement.scrollHeight,
        n_cells: document.querySelectorAll('.jp-Cell').length,
        grid_y: grid ? grid.getBoundingClientRect().top + window.scrollY : null,
        grid_h: grid ? grid.getBoundingClientRect().height : null};
})();
"""

class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *a): pass

def browser_test(pages, shots_dir=OUT/'screenshots'):
    "Open every page in headless Chromium; return (failures, screenshot paths)"
    binary, driver = find_chromium()
    shots_dir.mkdir(parents=True, exist_ok=True)
    for f in shots_dir.glob('*.png'): f.unlink()
    srv = ThreadingHTTPServer(('127.0.0.1', 0), partial(_QuietHandler, directory=str(OUT)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f'http://127.0.0.1:{srv.server_address[1]}/'
    fails, shots, chrome = [], [], None
    try:
        chrome = Chrome(binary, driver)
        for stem, path in pages:
            rel = path.relative_to(OUT).as_posix()
            chrome.get(base + rel)
            for _ in range(50):
                if chrome.js('return document.readyState') == 'complete': break
                time.sleep(0.1)
            for _ in range(100):   # let MathJax finish typesetting before measuring and screenshots
                if not chrome.js('return window.MathJax && MathJax.Hub ? MathJax.Hub.queue.pending + MathJax.Hub.queue.running : 0'): break
                time.sleep(0.1)
            r = chrome.js(PAGE_CHECK)
            bad = ([f'{rel}: broken image {s!r}' for s in r['broken']] + [f'{rel}: error output: {e}' for e in r['errs']]
                   + [f'{rel}: broken link to {u}' for u in r['dead']])
            if not r['n_cells']: bad.append(f'{rel}: page has no cells (rendering failed?)')
            fails += bad
            log(f"{rel}: {r['n_cells']} cells, {r['n_img']} images, {r['n_links']} local links, {r['height']} px tall"
                + (f" -- {len(bad)} problem(s)" if bad else ' -- ok'))
            name = SHOTS.get(stem)
            if name:
                shots.append(chrome.shot(shots_dir/f'{name}.png', max_height=1800 if stem != 'index' else 5000))
                if stem == '03_training':
                    if r['grid_y'] is None: fails.append(f'{rel}: no epoch grid found on the page (a widget output, its static picture, or a picture from a cell whose last line names EpochGrid, grid or progression)')
                    else: shots.append(chrome.shot(shots_dir/'training_epoch_grid.png', y=max(0, int(r['grid_y']) - 40),
                                                   height=int(r['grid_h']) + 80, max_height=2500))
    finally:
        if chrome: chrome.close()
        srv.shutdown(); srv.server_close()
    return fails, shots

# ---------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--execute', choices=['auto', 'always', 'never'], default='auto',
                   help='run notebooks before rendering: auto = only those stored without outputs')
    p.add_argument('--nb-timeout', type=int, default=600, help='seconds allowed to execute one notebook')
    p.add_argument('--browser-only', action='store_true', help='only re-run the browser test on _docs_preview/')
    p.add_argument('--no-browser', action='store_true', help='render and check, skip the Chromium test')
    p.add_argument('--force', action='store_true', help='reprocess every notebook (ignore nbdev\'s _proc cache)')
    p.add_argument('--execute-in-place', action='store_true', help='(CI) add outputs to nbs/ notebooks stored without any, then stop')
    p.add_argument('--exec-one', nargs=2, metavar=('SRC', 'DST'), help=argparse.SUPPRESS)
    p.add_argument('--raw', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--flags', nargs='*', default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.chdir(ROOT)
    from nbdev.config import get_config
    flags = tuple(a.flags) if a.flags is not None else tuple(get_config().get('tst_flags', '').split())
    if a.exec_one:
        if a.raw: return exec_raw(*a.exec_one, flags)
        return exec_one(*a.exec_one, flags)
    t0 = time.time()
    try:
        if a.execute_in_place: return execute_in_place(a.nb_timeout, flags)
        if a.browser_only:
            pages = [(Path(f).stem, f) for f in sorted(OUT.rglob('*.html'), key=lambda f: (f.name != 'index.html', str(f)))
                     if 'screenshots' not in f.parts and not any(x.startswith('_') for x in f.relative_to(OUT).parts)]
            if not pages: raise PreviewError('no pages in _docs_preview/: run `make docs-preview` first')
            probs = []
        else:
            log('processing notebooks (nbdev: nbs/ -> _proc/)...')
            proc_probs = process_nbs(force=a.force)
            for x in proc_probs: log(f'FAIL {x}')
            t1 = time.time(); log(f'processed in {t1-t0:.0f}s')
            order = page_order()
            if not order: raise PreviewError('no processed notebooks found in _proc/')
            sources, exec_probs = execute_where_needed(order, a.execute, a.nb_timeout, flags)
            t2 = time.time()
            for f in OUT.rglob('*.html'):   # old pages (never inside _exec/ or the _mathjax link)
                if not any(x.startswith('_') for x in f.relative_to(OUT).parts) and not f.is_symlink(): f.unlink()
            rendered = render(sources, get_config().get('title', 'docs'))
            t3 = time.time(); log(f'rendered {len(rendered)} pages to {OUT.relative_to(ROOT)}/ in {t3-t2:.0f}s')
            pages = [(stem, path) for stem, path, _ in rendered]
            probs = proc_probs + exec_probs + [x for _, _, ps in rendered for x in ps]
        fails, shots = ([], []) if a.no_browser else browser_test(pages)
        fails = probs + fails
        for s in shots: log(f'screenshot: {Path(s).relative_to(ROOT)}')
        for n in NOTES: log(f'note: {n}')
        if fails:
            for f in fails: print('  FAIL', f, file=sys.stderr)
            raise PreviewError(f'{len(fails)} problem(s) in the rendered docs (listed above)')
        log(f'ok: {len(pages)} pages checked in {time.time()-t0:.0f}s' + (' (browser test skipped)' if a.no_browser else ''))
    except PreviewError as e:
        sys.exit(f'docs-preview: {e}')

def exec_raw(src, dst, skip_flags):
    "Child process for --execute-in-place: run `src` like nbdev_test and write it with outputs, unprocessed"
    os.environ['IN_TEST'] = '1'
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    src, dst, flags = Path(src), Path(dst), set(skip_flags)
    nb = read_nb(src)
    def _no_eval(cell):
        if cell.cell_type != 'code' or 'nbdev_export'+'(' in cell.source: return True
        d = directives(cell.source)
        return d.get('eval') == 'false' or bool(flags & d.keys())
    k = CaptureShell(src)
    with working_directory(src.parent): k.run_all(nb, exc_stop=True, preproc=_no_eval)
    try:
        from ipywidgets import Widget
        st = Widget.get_manager_state(drop_defaults=True)
        if st.get('state'): nb.metadata['widgets'] = {WSTATE_MIME: st}
    except ImportError: pass
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)

if __name__ == '__main__': main()
