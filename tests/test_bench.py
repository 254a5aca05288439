"""benchmarks/bench.py in --smoke mode (32 px, tiny nets, a couple of steps): keeps the benchmark from rotting.
Nothing here is timed; it checks the harness computes what BENCHMARKS.md claims (e.g. `fit` and the plain loop
are the same algorithm: identical losses)."""
import importlib.util, json, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def load_bench():
    spec = importlib.util.spec_from_file_location('bench', ROOT/'benchmarks'/'bench.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

def test_smoke(tmp_path):
    bench = load_bench()
    md = tmp_path/'B.md'
    md.write_text(f'# Hand-written intro\n\n{bench.BEGIN}\nold numbers\n{bench.END}\n\nHand-written notes.\n')
    res = bench.main(['--smoke', '--size', '32', '--md', str(md)])
    text = md.read_text()
    assert text.startswith('# Hand-written intro') and text.rstrip().endswith('Hand-written notes.') and 'old numbers' not in text
    for h in ('### Targets', 'fit/plain', 'Faster settings', 'Inference', 'Data pipeline', 'image size and batch size', 'CycleGAN'):
        assert h in text, h
    js = json.loads(md.with_suffix('.json').read_text())
    assert len(js['targets']) == 4 and all(isinstance(t['met'], bool) for t in js['targets'])
    assert all(v > 0 for v in res['matmul_flops'].values())
    for r in res['fit_vs_plain'].values():
        assert r['flops'] > 0 and r['plain_s'] > 0 and r['fit_s'] > 0
        assert r['fit_vs_plain_loss'] < 1e-5 # the Learner + trainer callback computes exactly the plain loop's update
    v = res['variants']
    assert v['fp32 + fused Adam']['rel'] < 1e-3 and v['fp32 + channels_last']['rel'] < 1e-3
    assert 0 < v['bf16 autocast']['rel'] < 5e-2 # bf16 differs, but only a little

def test_flops_counted():
    bench = load_bench()
    import torch
    lin = torch.nn.Linear(64, 32, bias=False); x = torch.randn(8, 64)
    assert bench.count_flops(lambda: lin(x)) == 2 * 8 * 64 * 32

def test_bad_size():
    bench = load_bench()
    with pytest.raises(SystemExit): bench.main(['--smoke', '--size', '48'])

def test_perf_smoke(tmp_path):
    "benchmarks/perf.py --smoke (no compile: tests/test_compile.py checks it): every table is written, targets are booleans."
    spec = importlib.util.spec_from_file_location('perf', ROOT/'benchmarks'/'perf.py')
    perf = importlib.util.module_from_spec(spec); spec.loader.exec_module(perf)
    md = tmp_path/'B.md'
    md.write_text(f'# Intro\n\n{perf.BEGIN}\nold\n{perf.END}\n\nNotes.\n')
    res = perf.main(['--smoke', '--no-compile', '--md', str(md)])
    text = md.read_text()
    assert text.startswith('# Intro') and text.rstrip().endswith('Notes.') and '\nold\n' not in text
    for h in ('reference algorithm vs `fit`', 'torch.profiler', 'as the work grows', 'Targets'): assert h in text, h
    assert all(isinstance(t['met'], bool) for t in res['targets']) and len(res['targets']) == 2
    for r in res['reference_vs_fit'].values():
        assert r['fit']['rel'] < 1e-2   # fit's defaults compute the reference's update (fp32 here: fused Adam only)
    assert res['profile'] and all(p['top'] for p in res['profile'].values())
    assert res['slopes']['pixels'] > 0

def test_infer_smoke(tmp_path):
    "benchmarks/infer.py --smoke (no compile: slow to compile, tested in test_inference.py): every table written, outputs close to fp32."
    spec = importlib.util.spec_from_file_location('infer', ROOT/'benchmarks'/'infer.py')
    infer = importlib.util.module_from_spec(spec); spec.loader.exec_module(infer)
    md = tmp_path/'B.md'
    md.write_text(f'# Intro\n\n{infer.BEGIN}\nold\n{infer.END}\n\nNotes.\n')
    res = infer.main(['--smoke', '--no-compile', '--md', str(md)])
    text = md.read_text()
    assert text.startswith('# Intro') and text.rstrip().endswith('Notes.') and '\nold\n' not in text
    for h in ('The network alone', 'A folder end to end', 'peak MiB', 'GPU'): assert h in text, h
    assert len(res['forward']) == 8 and all(r['ips'] > 0 and r['peak'] > 0 for r in res['forward'])
    for r in res['forward']:   # fp32 layouts agree to rounding, bf16 is close
        assert r['diff'] < (1e-5 if r['precision'] == 'fp32' else 0.1), r
    assert [r['n'] for r in res['folder']] == [4] * 4 and json.loads(md.with_suffix('.infer.json').read_text())['forward']
