"""vdjax: latent video diffusion in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="vdjax",
    version="0.1.0",
    description="Video diffusion in JAX: AnimateDiff, VideoCrafter1/2, I2V-Adapter and MagDiff in Flax NNX",
    packages=find_packages(include=["vdjax", "vdjax.*"]),
    package_data={"vdjax.assets": ["*.txt.gz", "*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",  # optax.tree.norm
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.5",
        "transformers>=4.40",  # CLIPTokenizer only; the models are vdjax's own
        "ftfy>=6.1",  # OpenCLIP's text cleaning
        "regex>=2023.0",  # CLIP's word pattern (\p{L}, \p{N})
        "grain>=0.2",  # the training input pipeline (vdjax.data.pipeline)
        "safetensors>=0.4",
        "tensorboardX>=2.6",  # TensorBoard summaries of training runs, without TensorFlow
        "numpy>=1.26",
    ],
    extras_require={
        # Reading .ckpt/.pt/.bin checkpoints. On CPU-only machines install a CPU build of torch first.
        "torch": ["torch>=2.1"],
        # Preparing and reading the TFDS builders (vdjax.data.tfds_builders); neither needs TensorFlow itself.
        "data": ["tensorflow-datasets>=4.9", "grain>=0.2", "array_record>=0.5"],
        # The test suite and its PyTorch references.
        # peft: diffusers' own LoRA loading, the reference for LoRA merging. tensorflow-datasets + array_record:
        # preparing and reading the TFDS builders (neither needs TensorFlow). nbclient + nbformat + ipykernel: executing
        # the notebooks (tests/test_notebooks.py).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.88", "torch>=2.1", "diffusers>=0.30",
                 "transformers>=4.40", "peft>=0.13", "tensorflow-datasets>=4.9", "array_record>=0.5",
                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
    },
)
