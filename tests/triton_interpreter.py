"""Running Triton kernels on the CPU for tests: Triton's interpreter in a child process.

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported, so a test
module runs itself as a script in a child process that prints one JSON object of results, and its
tests read them (`run_child`). `patch_interpreter` mends two gaps of Triton 3.6's interpreter.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def patch_interpreter():
    """Work around two gaps of Triton 3.6's interpreter (the GPU compiler is not affected).

    It converts loop bounds with int() on one-element arrays, which numpy >= 2.4 rejects, and it
    multiplies bfloat16 `tl.dot` operands as their raw uint16 storage.
    """
    import triton.language as tl
    import triton.runtime.interpreter as interp

    patch_tensor = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interp._patch_lang_tensor = patched
    create_dot = interp.InterpreterBuilder.create_dot

    def dot(self, a, b, d, *rest):
        def widen(h):
            if h.dtype == tl.bfloat16:
                return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32),
                                           tl.float32)
            return h
        return create_dot(self, widen(a), widen(b), d, *rest)

    interp.InterpreterBuilder.create_dot = dot


def outcome(run, *args):
    """`run(*args)`, or {"error": ...} where it raises: a child reports each case's failure to
    the parent test that reads it, and goes on with the other cases."""
    try:
        return run(*args)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def run_child(script: str) -> dict:
    """Run `script --interpret` under the interpreter; return the JSON object it printed last.

    Skips the calling test where triton is not installed.
    """
    pytest.importorskip("triton", reason="triton is not installed (pip install triton) to run "
                                         "the kernels interpreted")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.path.dirname(script),
                                                        os.environ.get("PYTHONPATH")])))
    # test_kernels.py's child takes about 7 minutes on a 2-core machine that runs nothing else;
    # the limit leaves room for a busier one.
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--interpret"], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
