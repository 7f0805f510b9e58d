"""Build detr_fast and its one extension, detr_fast._C.

C++ CPU kernels are always built. CUDA kernels (csrc/**/*.cu) are added when torch is a CUDA build and nvcc is
found (CUDA_HOME); FORCE_CUDA=1 demands them, FORCE_CUDA=0 leaves them out.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda(torch, cuda_home):
    force = os.environ.get("FORCE_CUDA", "").strip()
    if force == "1":
        if cuda_home is None or torch.version.cuda is None:
            raise RuntimeError("FORCE_CUDA=1 but nvcc (CUDA_HOME) or a CUDA build of torch is missing")
        return True
    if force == "0":
        return False
    return torch.version.cuda is not None and cuda_home is not None


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    with_cuda = _want_cuda(torch, CUDA_HOME)
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    define_macros = [("Py_LIMITED_API", "0x030b0000")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # no GPU to ask: build for Hopper (sm_90, the card this project targets) plus PTX that newer GPUs JIT;
            # set TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") to build for others
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
            print("detr_fast: no GPU visible; building CUDA kernels for TORCH_CUDA_ARCH_LIST=9.0+PTX")
        # torch's CUDA wheels ship cuBLAS & co. headers under nvidia/cu13/include; the local toolkit may lack them.
        try:
            import nvidia  # noqa: F401

            for base in nvidia.__path__:
                for sub in glob.glob(os.path.join(base, "cu*", "include")):
                    include_dirs.append(sub)
        except ImportError:
            pass
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        if os.environ.get("NVCC_THREADS"):
            nvcc.append(f"--threads={os.environ['NVCC_THREADS']}")
        define_macros.append(("DETR_FAST_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "detr_fast._C",
            cpp + cu,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "detr_fast._C",
            cpp,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return [ext]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


setup(
    name="detr_fast",
    version="0.1.0",
    description="DETR training engine with fused C++/CUDA kernels",
    packages=find_packages(include=["detr_fast", "detr_fast.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "numpy", "scipy", "pycocotools", "pyyaml", "pillow", "matplotlib"],
    entry_points={"console_scripts": ["detr-fast=detr_fast.cli:main"]},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
