"""selectit_jax: SelectIT (arXiv 2402.16705) data selection in JAX/Flax."""
import setuptools

setuptools.setup(
    name="selectit_jax",
    version="0.1.0",
    description=("Selective instruction tuning via uncertainty-aware "
                 "self-reflection, in JAX/Flax."),
    packages=setuptools.find_packages(include=["selectit_jax", "selectit_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "transformers>=4.46",
        "sentencepiece",
        "absl-py",
        "ml_collections",
        "gguf",
        "safetensors",
        "numpy",
        "scipy",  # sweeps: Kendall tau-b with tie corrections
        "ml_dtypes",
        "pyarrow",
        "tqdm",
        "matplotlib",
        "grain",
        "tensorboardX",
        "protobuf",
    ],
    extras_require={
        # torch is pinned: a CPU wheel of exactly this version is on local disk,
        # an unpinned torch pulls a multi-GB CUDA build.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "accelerate", "pyink==26.5.1"],
        "tfds": ["tensorflow-datasets"],
    },
)
