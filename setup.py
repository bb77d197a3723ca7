import os

from setuptools import find_packages, setup

# part_distill._C holds the fused CPU k-means (part_distill/csrc). It is optional: without a C++
# compiler (or with PART_DISTILL_NO_EXT=1) the package installs without it and k-means runs the
# torch path, which gives the same results more slowly.
ext_modules, cmdclass = [], {}
if os.environ.get("PART_DISTILL_NO_EXT", "") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch is needed to build; a build without it installs the pure-Python package
        pass
    else:
        ext_modules = [
            CppExtension(
                "part_distill._C",
                ["part_distill/csrc/kmeans_cpu.cpp"],
                # fp-contract=fast: a * b + c on vectors becomes one FMA under the AVX2 target.
                extra_compile_args={"cxx": ["-O3", "-ffp-contract=fast", "-Wno-psabi"]},
                depends=["part_distill/csrc/kmeans_cpu_impl.h"],
            )
        ]

        class OptionalBuildExt(BuildExtension.with_options(use_ninja=False)):
            """A failed compile (no compiler, old toolchain) warns and installs the package without _C."""

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as e:  # noqa: BLE001 - any compiler failure means the fallback
                    print(f"WARNING: part_distill._C was not built ({e}); k-means falls back to the torch path")

        cmdclass = {"build_ext": OptionalBuildExt}

setup(
    name="part_distill",
    version="0.1.0",
    description="PartDistillation: learning part segmentation without part labels, as a detectron2 extension",
    packages=find_packages(include=["part_distill", "part_distill.*"]),
    python_requires=">=3.9",
    install_requires=["numpy<2", "pycocotools", "scikit-learn", "tqdm", "opencv-python-headless"],
    package_data={"part_distill": ["assets/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
