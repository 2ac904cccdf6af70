"""Build: the pybind11 module neuroidx_fast._C (CPU kernels, csrc/cpu, OpenMP where the compiler has it).

It needs only a C++17 compiler and pybind11, never torch headers, so one build serves every torch
version and ``pip install .`` works with build isolation. kernels/ is installed as
neuroidx_fast.kernels and csrc/cuda (the .cu sources compiled at run time by CuPy) as
neuroidx_fast.cuda_src.
"""

import os
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(compiler, flag: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
        except Exception:
            return False
    return True


class BuildWithOpenMP(build_ext):
    """Adds OpenMP flags when the compiler supports them; the kernels fall back to one thread otherwise."""

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            flags, link = ["/openmp", "/O2"], []
        elif _compiler_accepts(self.compiler, "-fopenmp"):
            # no errno from sqrt / log: the kernels never read it, and it keeps those calls vectorised
            flags, link = ["-fopenmp", "-O3", "-fno-math-errno"], ["-fopenmp"]
        else:
            print("neuroidx_fast: compiler without OpenMP, building single-threaded CPU kernels", file=sys.stderr)
            flags, link = ["-O3", "-fno-math-errno"], []
        for ext in self.extensions:
            ext.extra_compile_args += flags
            ext.extra_link_args += link
        super().build_extensions()


ext_modules = [
    Pybind11Extension(
        "neuroidx_fast._C",
        sorted(os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join("csrc", "cpu")) if f.endswith(".cpp")),
        include_dirs=[os.path.join("csrc", "cpu")],
        # the headers too, so that an in-place rebuild after editing one recompiles the sources
        depends=sorted(os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join("csrc", "cpu"))
                       if f.endswith(".h")),
        cxx_std=17,
    )
]

setup(
    packages=["neuroidx_fast", "neuroidx_fast.ops", "neuroidx_fast.kernels", "neuroidx_fast.cuda_src"],
    package_dir={"neuroidx_fast.kernels": "kernels", "neuroidx_fast.cuda_src": "csrc/cuda"},
    package_data={"neuroidx_fast": ["templates/*.html", "templates/*.css", "templates/*.js", "assets/*.safetensors"],
                  "neuroidx_fast.cuda_src": ["*.cu", "*.cuh"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildWithOpenMP},
    zip_safe=False,
)
