"""Run a command and fail if it changed any file under the given folders.

Usage: python tools/unchanged.py DIR [DIR...] -- CMD [ARGS...]
Used by `make test` to check that `nbdev_export` / `nbdev_clean` are no-ops (the library is in
sync with the notebooks and the notebooks are stored clean), also in a dirty working tree.
"""
import hashlib, subprocess, sys
from pathlib import Path

def snapshot(dirs):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted(Path(d).rglob('*'))
            if p.is_file() and '__pycache__' not in p.parts and '.ipynb_checkpoints' not in p.parts}

def main(argv):
    if '--' not in argv: sys.exit("usage: unchanged.py DIR [DIR...] -- CMD [ARGS...]")
    i = argv.index('--')
    dirs, cmd = argv[:i], argv[i+1:]
    before = snapshot(dirs)
    subprocess.run(cmd, check=True)
    after = snapshot(dirs)
    changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
    if changed:
        sys.exit(f"`{' '.join(Path(cmd[0]).name for _ in [0])}` changed {len(changed)} file(s): {', '.join(changed)}"
                 " -- run `make export` and commit the result")
    print(f"ok: {Path(cmd[0]).name} left {', '.join(dirs)} unchanged")

if __name__ == '__main__': main(sys.argv[1:])
