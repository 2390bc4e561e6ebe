"""unimm: JAX/Flax unified multimodal models (Harmon, UAE + Unified-GRPO)."""
from setuptools import find_packages, setup

setup(
    name="unimm",
    version="0.1.0",
    description="Unified multimodal models (image understanding + generation) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unimm", "unimm.*"]),
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.12.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.6",
        "grain>=0.2.10",
        "ml_collections>=1.0.0",
        "chex>=0.1.88",
        "clu>=0.0.12",
        "numpy>=1.26",
        "pillow>=10.0",
        "safetensors>=0.4.3",
        "tokenizers>=0.20",
        "absl-py>=2.1",
        # clu's metric writers and periodic actions import TensorFlow and TensorBoard.
        "tensorflow-cpu>=2.16",
        "tensorboard>=2.16",
    ],
    extras_require={
        # Reading official .pth / .ckpt checkpoints (torch.load(weights_only=True)).
        "torch": ["torch>=2.4"],
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",   # the suite runs on two workers (most tests are compile-bound)
            "ruff==0.17.6",          # tests/test_lint.py, settings in pyproject.toml; pinned: rules change
            "torch==2.13.0",
            "transformers>=4.45",
            "scipy>=1.11",
            # notebooks/quickstart.ipynb is executed by tests/test_notebook.py
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
)
