"""The compiled kernels: C extension modules built with the package (see pyproject.toml for
everything else). They need a C compiler when emdask is installed from source; a wheel
carries them built."""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    FLAGS = ["/O2", "/fp:contract"]
else:
    # -O3 vectorises the loops along the rows; sums that may be reassociated say so with
    # `omp simd reduction` (-fopenmp-simd: no OpenMP runtime); no errno, no traps, fused
    # multiply-adds. Nothing assumes away NaN or infinities.
    FLAGS = ["-O3", "-std=c11", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=fast", "-Wall", "-Wno-unknown-pragmas"]

KERNELS = [
    Extension(
        f"emdask.families._c{name}",
        sources=[f"emdask/families/_csrc/{name}.c"],
        depends=["emdask/families/_csrc/common.h", "emdask/families/_csrc/gaussian_chunks.h"],
        extra_compile_args=FLAGS,
    )
    for name in ("gaussian", "discrete")
]

setup(ext_modules=KERNELS)
