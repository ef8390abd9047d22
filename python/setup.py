"""Build hook of the kdkit package (see pyproject.toml): compile libkdkit
from the repository (the parent of this directory, or $KDKIT_SOURCE_DIR)
with CMake and ship libkdkit.so inside the package, where kdkit/_lib.py
looks first.  Everything else is declared in pyproject.toml."""
import os
import shutil
import subprocess

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        src = os.environ.get("KDKIT_SOURCE_DIR") or os.path.dirname(here)
        if not os.path.exists(os.path.join(src, "CMakeLists.txt")):
            raise RuntimeError("kdkit: the C sources are not at %s; set KDKIT_SOURCE_DIR to "
                               "the repository" % src)
        bdir = os.path.join(os.path.abspath(self.build_lib), "..", "kdkit-cmake")
        subprocess.check_call(["cmake", "-S", src, "-B", bdir, "-DCMAKE_BUILD_TYPE=Release",
                               "-DKD_BUILD_TESTS=OFF", "-DKD_BUILD_BENCH=OFF"])
        subprocess.check_call(["cmake", "--build", bdir, "--target", "kdkit", "-j2"])
        dest = os.path.join(self.build_lib, "kdkit", "libkdkit.so")
        shutil.copyfile(os.path.realpath(os.path.join(bdir, "libkdkit.so")), dest)


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True  # the wheel carries a native library: not pure-Python


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
