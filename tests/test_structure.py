"""The library's floor plan: pix2pix_nb modules import each other only downward (no cycle, also not through
imports hidden inside functions), and every module stays small enough to read."""
import ast
from pathlib import Path
import pytest

LIB = Path(__file__).resolve().parents[1]/'pix2pix_nb'
MODULES = sorted(p.stem for p in LIB.glob('*.py') if p.stem not in ('__init__', '_modidx'))

def imports_of(name:str) -> set:
    "pix2pix_nb modules that module `name` imports anywhere in its code (top level or inside functions)."
    tree, out = ast.parse((LIB/f'{name}.py').read_text()), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: out |= {mod.split('.')[0]} if mod else {a.name for a in node.names}
            elif mod.startswith('pix2pix_nb.'): out.add(mod.split('.')[1])
            elif mod == 'pix2pix_nb': out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split('.')[1] for a in node.names if a.name.startswith('pix2pix_nb.')}
        elif isinstance(node, ast.Call) and getattr(node.func, 'attr', getattr(node.func, 'id', '')) in ('import_module', '__import__'):
            out |= {a.value.split('.')[1] for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith('pix2pix_nb.')}
    return out & set(MODULES)

GRAPH = {m: imports_of(m) for m in MODULES}

def find_cycle(graph:dict):
    "A cycle in `graph` as a list of nodes, or None."
    state, stack = {}, []
    def visit(n):
        state[n] = 'open'; stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 'open': return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)): return c
        state[n] = 'done'; stack.pop()
    for n in sorted(graph):
        if n not in state and (c := visit(n)): return c

def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH))}"

def test_cycle_finder_finds_cycles():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None

def test_core_is_the_floor():
    assert GRAPH['core'] == set(), GRAPH['core']
    assert all('core' in deps for m, deps in GRAPH.items() if m != 'core'), 'every module builds on core'

@pytest.mark.parametrize('name', MODULES)
def test_module_size(name):
    n = len((LIB/f'{name}.py').read_text().splitlines())
    assert n <= 500, f'{name}.py has {n} lines: split it by concept'

def test_cli_is_the_roof():
    "Nothing imports the command-line module: it may use everything, nothing depends on it."
    assert not [m for m, deps in GRAPH.items() if 'cli' in deps]
