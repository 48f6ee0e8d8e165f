"""Build the one compiled extension, dispatch._fdpass, from Cython."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extension = Extension(
    "dispatch._fdpass",
    ["src/dispatch/_fdpass.pyx"],
    define_macros=[("_GNU_SOURCE", None)],  # accept4, MSG_CMSG_CLOEXEC
    extra_compile_args=["-O2"],
)

setup(
    ext_modules=cythonize(
        [extension],
        include_path=["src"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
        },
    )
)
