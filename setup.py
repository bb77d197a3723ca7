from setuptools import find_packages, setup

setup(
    name="part_distill",
    version="0.1.0",
    description="PartDistillation: learning part segmentation without part labels, as a detectron2 extension",
    packages=find_packages(include=["part_distill", "part_distill.*"]),
    python_requires=">=3.9",
    install_requires=["numpy<2", "pycocotools", "scikit-learn", "tqdm", "opencv-python-headless"],
    package_data={"part_distill": ["assets/*"]},
)
