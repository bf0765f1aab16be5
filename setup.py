"""Build and install the MoE training system: packages ``moe`` and ``parallel`` and the
``moe._C`` kernel extension.

Install (torch must already be importable, so no build isolation)::

    pip install --no-build-isolation -e .

``moe._C`` always holds the C++ CPU kernels (``csrc/cpu/*.cpp``, OpenMP, -O3). The CUDA
kernels (``csrc/cuda/*.cu`` + ``csrc/cuda/*.cpp``) are added only when torch is a CUDA
build, ``CUDA_HOME`` is found, and ``MOE_SKIP_CUDA`` is not "1". The GPU is never queried
here: ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default ``8.0;9.0+PTX``).
"""
from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _sources(pattern: str) -> list:
    """Sorted source paths matching ``pattern``, relative to the repository root."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_decision(torch_module, cuda_home) -> tuple:
    """(build_cuda, why) from the torch build, CUDA_HOME and MOE_SKIP_CUDA; no GPU query."""
    if os.environ.get("MOE_SKIP_CUDA") == "1":
        return False, "MOE_SKIP_CUDA=1"
    if not torch_module.version.cuda:
        return False, "torch is not a CUDA build"
    if cuda_home is None:
        return False, "CUDA_HOME was not found"
    return True, f"torch CUDA {torch_module.version.cuda}, CUDA_HOME={cuda_home}"


def _build_ext_class(cpp_extension):
    """BuildExtension (ninja) that keeps its object files in ``build/`` between builds.

    An editable install otherwise compiles in a fresh temporary folder every time; a
    fixed folder lets ninja rebuild only the sources that changed.
    """

    class BuildExt(cpp_extension.BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp.moe")

    return BuildExt.with_options(use_ninja=True)


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - exercised only by a broken install
        raise RuntimeError(
            "building moe._C needs torch importable at build time: install torch first, then run "
            "`pip install --no-build-isolation -e .`"
        ) from exc

    cpu_sources = _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]
    build_cuda, why = _cuda_decision(torch, cpp_extension.CUDA_HOME)
    print(f"moe._C: CUDA kernels {'enabled' if build_cuda else 'disabled'} ({why})")
    if not build_cuda:
        ext = cpp_extension.CppExtension(
            "moe._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
        return [ext], _build_ext_class(cpp_extension)
    # Without an explicit list, torch would ask the visible GPU for its architecture.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    ext = cpp_extension.CUDAExtension(
        "moe._C",
        cpu_sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
        include_dirs=[os.path.join(ROOT, "csrc", "cpu"), os.path.join(ROOT, "csrc", "cuda")],
        define_macros=[("MOE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], _build_ext_class(cpp_extension)


ext_modules, build_ext = _extensions()

setup(
    name="moe-train",
    version="0.1.0",
    description="Distributed Mixture-of-Experts training: routing, kernels, expert parallelism",
    packages=find_packages(include=["moe", "moe.*", "parallel", "parallel.*"]),
    python_requires=">=3.10",
    # torch is deliberately absent: it must already be installed (a CPU or CUDA build of
    # torch==2.13.0, see requirements.txt); listing it here could pull a different build.
    install_requires=[],
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
