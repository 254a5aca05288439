"""`fit(compile=True)` / `CompileNets`: compiled training computes what eager training computes (dropout included), and
falls back to eager with one line where compiling is unsupported. Tiny nets, CPU; the speed is measured in benchmarks/."""
import pytest, torch
from pix2pix_nb import callbacks
from pix2pix_nb.callbacks import CompileNets, compile_supported
from test_train import make, state, data   # the tiny G/D learner and its data fixture

def _losses(learn): return {k: float(v) for k, v in learn.trainer.last_losses.items()}

def test_compiled_training_matches_eager(data, tmp_path):
    ok, why = compile_supported('cpu')
    if not ok: pytest.skip(f"torch.compile unavailable here: {why}")
    eager = make(data, tmp_path/'e'/'ck.pt'); eager.fit_linear_decay(1, 0)
    cn = CompileNets(); comp = make(data, tmp_path/'c'/'ck.pt', extra=[cn]); comp.fit_linear_decay(1, 0)
    assert cn.compiled and cn.compile_s is not None and cn.compile_s > 0
    le, lc = _losses(eager), _losses(comp)
    assert le.keys() == lc.keys() and all(abs(le[k] - lc[k]) <= 1e-4 * max(1., abs(le[k])) for k in le), (le, lc)
    assert state(eager).keys() == state(comp).keys()   # compiled in place: checkpoints and exports keep the same keys
    # the trained generators agree (weights are not compared one by one: a conv bias right before batch norm gets a
    # gradient of ~0 whose rounding Adam blows up to a full step; the norm cancels it in the output)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad(): ye, yc = eager.model.G.eval()(x), comp.model.G.eval()(x)
    assert torch.allclose(ye, yc, atol=1e-3), (ye - yc).abs().max()
    # nothing of the compile outlives fit: the nets are eager modules again and the global stance is the default
    assert all(getattr(m, '_compiled_call_impl', None) is None for m in comp.trainer.nets.values())
    assert torch.compile(lambda t: t + int(torch.compiler.is_compiling()))(torch.zeros(1)).item() == 1

def test_compile_falls_back_with_one_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(callbacks, 'compile_supported', lambda dev: (False, 'no C++ compiler'))
    cn = CompileNets(); learn = make(data, tmp_path/'ck.pt', extra=[cn]); learn.fit_linear_decay(1, 0)
    out = capsys.readouterr().out
    assert not cn.compiled and 'compile: not available on cpu here (no C++ compiler); training eagerly' in out
    assert len(learn.recorder.values) == 1
