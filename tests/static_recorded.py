"""Offline (sm_90) compile of the kernel configurations the launchers really choose, for the
launcher tests: the calls of bench/launch_capture.py are recorded in this process (Triton's
launches stubbed; the interpreter is on under the suite), and a child process without the
interpreter types each distinct launch with Triton's own specialisation
(bench/static_check.py) and compiles it, as ``python -m bench static`` does."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import json, pickle, sys
from bench import static_check
configs = static_check.configs_from_records(pickle.load(sys.stdin.buffer))
reports = static_check.compile_all(configs, arch=int(sys.argv[1]), workers=2)
print(json.dumps([{"kernel": c.fn.__name__, "name": c.name,
                   "constexprs": {k: v for k, v in c.constexprs.items() if k.isupper()},
                   "num_warps": c.num_warps, "registers": r.registers,
                   "widest_load_bits": r.widest_load_bits, "problems": r.problems()}
                  for c, r in zip(configs, reports)]))
"""


def recorded_reports(sources, arch: int = 90) -> list[dict]:
    """One compile report per launcher choice among the launches that the
    bench/launch_capture.py call ``sources`` (e.g. ``launch_capture._ce_calls``) make."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # bench/ is a folder of the repository
    import fusedgrad  # noqa: F401  (the launchers the calls go through)
    from bench import launch_capture

    old = launch_capture.CALL_SOURCES
    launch_capture.CALL_SOURCES = tuple(sources)
    try:
        records, errors = launch_capture.collect()
    finally:
        launch_capture.CALL_SOURCES = old
    assert not errors, errors
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-c", _CHILD, str(arch)], cwd=REPO, env=env,
                         input=pickle.dumps(records), capture_output=True, timeout=1200)
    assert res.returncode == 0, res.stderr.decode()[-4000:]
    return json.loads(res.stdout.decode().strip().splitlines()[-1])
