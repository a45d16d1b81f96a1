"""Build deltalog._kernels, the compiled row loops (src/deltalog/kernels.py explains them).

The extension is optional: without a C compiler the install still succeeds
and deltalog runs the same numpy code, only slower. Everything else about
the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "deltalog._kernels",
            ["src/deltalog/_kernels.c"],
            optional=True,
            extra_compile_args=["-O3"],
        )
    ]
)
