"""Build a host emulator of CUDA kernels (a C++ file on top of cuda_host.h) with torch.utils.cpp_extension.

The extension's name carries a hash of the kernel headers and the emulator sources: torch's build cache looks at
the listed source file only, so an edited kernel header would otherwise reuse a stale build.
"""
import glob
import hashlib
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")


def cuda_include() -> str | None:
    """The CUDA toolkit's include directory (cuda_runtime.h: dim3, the half types), or None when there is none."""
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def build(name: str, source: str, kernel_dirs: list[str], opt: str = "-O1", sanitize: str | None = None):
    """Compile tests/emulator/<source> against csrc/; kernel_dirs (relative to csrc/) are hashed into the name.
    Returns the loaded module; with sanitize (e.g. "thread": -fsanitize=thread, CUDA threads as OS threads) the built
    library's path instead, to be loaded by a process that has the sanitizer's runtime preloaded."""
    from torch.utils.cpp_extension import load

    include = cuda_include()
    if include is None:
        raise RuntimeError("the CUDA toolkit's headers (cuda_runtime.h) were not found; set CUDA_HOME")
    digest = hashlib.sha1()
    for d in [os.path.join(CSRC, k) for k in kernel_dirs] + [os.path.join(CSRC, "common"), HERE]:
        for fname in sorted(os.listdir(d)):
            if fname.endswith((".h", ".cuh", ".cpp")):
                with open(os.path.join(d, fname), "rb") as f:
                    digest.update(f.read())
    # -U_FORTIFY_SOURCE: the fibers switch stacks with _longjmp, which the fortified longjmp check would refuse
    cflags = ["-std=c++20", opt, "-fno-strict-aliasing", "-w", "-U_FORTIFY_SOURCE"]
    if not sanitize:
        return load(f"{name}_{digest.hexdigest()[:12]}", [os.path.join(HERE, source)],
                    extra_include_paths=[CSRC, HERE, include], extra_cflags=cflags, verbose=False)
    # A sanitized library loads only into a process with the sanitizer's runtime preloaded: build it, let the import
    # here fail, and return the library's path.
    from torch.utils.cpp_extension import _get_build_directory

    full = f"{name}_{sanitize}san_{digest.hexdigest()[:12]}"
    build_dir = _get_build_directory(full, verbose=False)
    try:
        load(full, [os.path.join(HERE, source)], extra_include_paths=[CSRC, HERE, include],
             extra_cflags=cflags + ["-g", f"-fsanitize={sanitize}", "-DDETR_EMULATE_OS_THREADS"],
             extra_ldflags=[f"-fsanitize={sanitize}"],
             build_directory=build_dir, verbose=False)
    except ImportError:
        pass
    libs = sorted(glob.glob(os.path.join(build_dir, f"{full}*.so")), key=os.path.getmtime)
    if not libs:
        raise RuntimeError(f"the sanitized emulator {full} was not built in {build_dir}")
    return libs[-1]


def build_kernels(sanitize: str | None = None):
    """kernels_emulator.cpp: the LayerNorm / relu_dropout, bias_act, scale_many, max pool, linear_assignment and box
    kernels with their launchers."""
    return build("detr_fast_kernels_emulator", "kernels_emulator.cpp",
                 ["layernorm", "bias_act", "scale", "pool", "assignment", "box_ops"], sanitize=sanitize)
