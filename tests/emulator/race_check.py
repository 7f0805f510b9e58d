"""Run the emulated CUDA kernels under ThreadSanitizer: a data race between the threads of one block (a missing
__syncthreads, a shared-memory slot read before its writer reached the barrier, two lanes writing one address) is
reported and fails the check.

    python tests/emulator/race_check.py

Builds kernels_emulator.cpp and attention_emulator.cpp with -fsanitize=thread in this process, then runs their
kernels (LayerNorm forward and backward with dropout in both row layouts, relu_dropout, bias_act on both paths,
relu_backward_sum, the assignment solver with each engine, matching_cost and box_loss, the attention kernels of each
dtype) in a child process with the sanitizer's runtime preloaded: a sanitized extension cannot be loaded into an
unsanitized Python otherwise, and the compiler must not run with it preloaded. The emulator orders a block's threads only through its barriers (mutex and condition variable, which the sanitizer understands),
so what it reports is a race on the device too. A deliberately racing kernel is run first, and must be reported.
Exit status 0 when that one race, and nothing else, is reported.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHILD_FLAG = "--child"
SELFTEST_FLAG = "--selftest-child"


def tsan_runtime() -> str | None:
    """Path of the compiler's ThreadSanitizer runtime, or None."""
    try:
        path = subprocess.run(["c++", "-print-file-name=libtsan.so"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _load(path):
    import importlib.util

    name = os.path.basename(path).split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def selftest_child(kernels_so: str) -> int:
    """A kernel that races (a shared-memory read without the barrier), which the sanitizer must report."""
    import torch  # noqa: F401  (the extension links against torch's libraries)

    _load(kernels_so).neighbour_read(False)
    return 0


def child(kernels_so: str, attention_so: str) -> int:
    import torch

    sys.path[:0] = [ROOT, HERE]
    import run_attention

    torch.set_num_threads(1)
    emu = _load(kernels_so)
    g = torch.Generator().manual_seed(0)
    # d: a warp per row with 1 and 8 vectors per lane, a block per row with 2 and 8 (group reductions in shared
    # memory); sms=1 so the backward's groups fold several rows and every grid-stride loop goes round
    for rows, d in ((7, 96), (6, 1000), (5, 1500), (3, 8192)):
        for dt in (torch.float32, torch.bfloat16):
            x, r = (torch.randn(rows, d, generator=g).to(dt) for _ in range(2))
            w, b = (torch.randn(d, generator=g).to(dt) for _ in range(2))
            out, mean, rstd, rng = emu.add_dropout_layernorm(x, r, w, b, 0.2, 1e-5, 5, 0, sms=1)
            emu.add_dropout_layernorm_backward(torch.randn(rows, d, generator=g).to(dt), x, r, w, mean, rstd, 0.2,
                                               rng, sms=1)
            y, _ = emu.relu_dropout(x, 0.2, 5, 0, sms=1)
            emu.relu_dropout_backward(x, y, 0.2, sms=1)
    x = torch.randn(4, 16, 12, 12, generator=g)
    emu.bias_act(x, torch.randn(16, generator=g), x.clone(), True, sms=1)
    emu.bias_act(x.contiguous(memory_format=torch.channels_last), torch.randn(16, generator=g), None, True, sms=1)
    emu.bias_act(x[:, :, :, 1:], torch.randn(16, generator=g), None, False, sms=1)  # scalar path
    emu.relu_backward_sum(x, x.clone(), x.relu(), sms=1)
    emu.relu_backward_sum(x.flatten()[1:], x.flatten()[:-1], x.flatten()[1:].relu(), sms=1)  # one element per step
    # the assignment solver's warp bids (atomics), block reductions and barriers: each engine, a cached and an
    # uncached cost matrix, 128 and 256 threads
    from detr_fast.ops.cases_assignment import make_costs, totals

    for engine in (0, 1, 2):
        for Q, T, family in ((20, 6, "detr"), (140, 12, "uniform"), (12, 12, "ties")):
            n = torch.tensor([T])
            cost = make_costs(family, (1, Q, T), n, g, torch.float64 if Q == 20 else torch.float32)
            totals(cost, n, emu.linear_assignment(cost, n, engine))  # a valid matching (asserts)
    # matching_cost's shared-memory staging of targets and row softmax (several target chunks), box_loss
    from detr_fast.ops.cases_box import box_pairs, matching_inputs

    logits, pred, labels, boxes, num = matching_inputs(g, (2,), 2, 40, 92, 70, True)
    emu.matching_cost(logits.float(), pred.float(), labels, boxes.float(), num, 1.0, 5.0, 2.0)
    pred, target = box_pairs(g, 300, True)
    l1, giou = emu.box_loss(pred.float(), target.float())
    emu.box_loss_backward(l1, giou, pred.float(), target.float())
    attn = _load(attention_so)
    ok = all(run_attention.run_case(attn, *run_attention.CASES[i]) for i in (1, 3, 5, 9))
    print("kernels ran" if ok else "attention results differ", flush=True)
    return 0 if ok else 1


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        return child(sys.argv[2], sys.argv[3])
    if len(sys.argv) > 1 and sys.argv[1] == SELFTEST_FLAG:
        return selftest_child(sys.argv[2])
    runtime = tsan_runtime()
    if runtime is None:
        print("no ThreadSanitizer runtime (libtsan) for this compiler", file=sys.stderr)
        return 2
    sys.path[:0] = [ROOT, HERE]
    import run_attention
    from build import build_kernels

    kernels = build_kernels(sanitize="thread")
    attention = run_attention.build(sanitize="thread")
    env = dict(os.environ, LD_PRELOAD=runtime, TSAN_OPTIONS="halt_on_error=0 report_signal_unsafe=0 exitcode=66")
    # first, that a race is seen at all
    proc = subprocess.run([sys.executable, __file__, SELFTEST_FLAG, kernels], env=env, capture_output=True, text=True)
    if "WARNING: ThreadSanitizer: data race" not in proc.stderr:
        sys.stderr.write(proc.stderr[-5000:])
        print("race check failed: the sanitizer did not report the emulator's deliberately racing kernel")
        return 1
    proc = subprocess.run([sys.executable, __file__, CHILD_FLAG, kernels, attention], env=env,
                          capture_output=True, text=True)
    races = proc.stderr.count("WARNING: ThreadSanitizer")
    sys.stdout.write(proc.stdout)
    if races or proc.returncode != 0:
        sys.stderr.write(proc.stderr[-20000:])
        print(f"race check failed: {races} ThreadSanitizer reports, exit status {proc.returncode}")
        return 1
    print("race check passed: no ThreadSanitizer report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
