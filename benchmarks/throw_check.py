"""Does an error raised inside the extension reach Python as an exception, or does it end the process?

Each case runs in a child process, so a crash ends only that child. The cases: a shape error raised by torch's own
C++ code (the control), then one raised by our extension's C++ code on the CPU and on the GPU, and the same kernels
called with good input. A crash prints the child's exit status and, when gdb is installed, its native backtrace.

    python benchmarks/throw_check.py            # every case this machine can run
"""
from __future__ import annotations

import shutil
import subprocess
import sys

SETUP = "import torch, detr_fast.ops as ops\n"
CASES = {
    "torch's own error (control)": "torch.ones(2, 3) @ torch.ones(4, 5)",
    "extension, good input, cpu": "x = torch.randn(4, 16); ops.add_dropout_layernorm(x, x, torch.ones(16), "
                                  "torch.zeros(16))",
    "extension error, cpu": "x = torch.randn(4, 16); ops.add_dropout_layernorm(x, x[:, :8], torch.ones(16), "
                            "torch.zeros(16))",
    "extension, good input, cuda": "x = torch.randn(4, 16, device='cuda'); ops.add_dropout_layernorm(x, x, "
                                   "torch.ones(16, device='cuda'), torch.zeros(16, device='cuda')); "
                                   "torch.cuda.synchronize()",
    "extension error, cuda": "x = torch.randn(4, 16, device='cuda'); ops.add_dropout_layernorm(x, x[:, :8], "
                             "torch.ones(16, device='cuda'), torch.zeros(16, device='cuda'))",
}
# the expected outcome: an exception for the error cases, a clean exit for the others
PROBE = """
try:
    {body}
except Exception as exc:
    print("raised", type(exc).__name__ + ":", str(exc).splitlines()[0][:120])
else:
    print("returned")
"""


def run_case(body: str, timeout: float = 120.0) -> tuple[int, str]:
    code = SETUP + PROBE.format(body=body)
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -999, "timed out"
    return p.returncode, (p.stdout + p.stderr).strip()


def backtrace(body: str) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(no gdb here: no native backtrace)"
    code = SETUP + PROBE.format(body=body)
    p = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("#") or "signal" in ln.lower()]
    return "\n".join(lines[-40:])


def main() -> int:
    import torch

    cuda = torch.cuda.is_available()
    crashed = 0
    for name, body in CASES.items():
        if "cuda" in name and not cuda:
            print(f"{name:32s} skipped (no GPU)")
            continue
        rc, out = run_case(body)
        last = out.splitlines()[-1] if out else ""
        if rc == 0:
            print(f"{name:32s} rc=0  {last}")
        else:
            crashed += 1
            print(f"{name:32s} CRASHED rc={rc}  {last}")
            print(backtrace(body))
    print(f"throw_check: {crashed} case(s) crashed")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
