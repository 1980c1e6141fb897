from setuptools import find_packages, setup

setup(
    name="hpc-localsgd",
    version="0.1.0",
    description="Local SGD, post-local SGD and SlowMo on MPI ranks, with Horovod, mpi4py or torch.distributed",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hpc_localsgd", "hpc_localsgd.*"]),
    # The JSON Schema of `hpc-localsgd bench --out` results ships with the package.
    package_data={"hpc_localsgd.bench": ["schema.json"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pyyaml>=6",
        "h5py>=3.8",
        "mpi4py>=3.1",
        "tqdm",
        # Checkpoint digests at memory bandwidth (hashlib's fastest is 10-30x slower).
        "xxhash>=3",
        # hpc-localsgd report: the study's figures as PNG and SVG.
        "matplotlib>=3.7",
        # data.name: mnist1d, generated offline by the package (Greydanus & Kobak 2024).
        "mnist1d>=0.0.2",
    ],
    extras_require={
        # Horovod must be built against the installed torch and MPI: see scripts/install.sh.
        "horovod": ["horovod==0.28.1"],
        "digits": ["scikit-learn"],
        "test": ["pytest>=8", "scikit-learn", "jsonschema>=4.18", "reframe-hpc>=4.5"],
        "bench": ["jsonschema>=4.18", "reframe-hpc>=4.5"],
    },
    entry_points={"console_scripts": ["hpc-localsgd=hpc_localsgd.cli:main"]},
)
