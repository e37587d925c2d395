"""topk-transformers: Top-k T5 and Top-k ViT (Li et al., 2022) in JAX / Flax."""

from setuptools import find_packages, setup

setup(
    name="topk-transformers",
    version="0.1.0",
    description="Top-k T5 and ViT: activation sparsity in trained Transformers (JAX/Flax, T5X-compatible).",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["topk_transformers", "topk_transformers.*"]) + ["topk_transformers.configs"],
    # configs/ stays at the top of the repository and ships inside the package, so a clone and an
    # installed wheel see the same gin files under the same names (gin_utils.config_root).
    package_dir={"topk_transformers.configs": "configs"},
    # native/row_kernels.cc is compiled on first use (row_kernels.py), so it ships as data.
    package_data={"topk_transformers.configs": ["**/*.gin"], "topk_transformers": ["native/*.cc"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "seqio>=0.0.19",
        # seqio requires `tensorflow`; naming it here keeps pip from also pulling tensorflow-cpu.
        "tensorflow>=2.16",
        "tensorflow-datasets>=4.9.6",
        "gin-config>=0.5.0",
        "clu>=0.0.12",
        "tensorboard",  # clu's metric writers import it
        "sentencepiece>=0.2.0",
        "importlib_resources",  # tfds needs it to prepare datasets
        "numpy",
        "matplotlib",
        "safetensors>=0.8",  # Hugging Face checkpoints (t5/convert.py), read through numpy (bfloat16 from 0.8 on)
        "msgpack",  # T5X checkpoints
        "tensorstore",
    ],
    extras_require={
        # The embedded defaults read data that these wheels ship (no download at run time).
        "demo": ["gensim>=4.3", "scikit-learn>=1.3"],
        # torch (CPU build from the local index) and transformers only check the checkpoint converters
        # against Hugging Face's PyTorch T5; the library itself never imports them.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "gensim>=4.3", "scikit-learn>=1.3", "torch==2.13.0", "transformers==5.24.0",
                 "safetensors"],
        # JAX for NVIDIA GPUs (CUDA 12 wheels, Pallas's Triton lowering included), beside the whole install. The core,
        # the benchmarks and decoding import only jax and flax: a GPU machine without TensorFlow runs
        # benchmarks/device_check.sh from a clone with jax[cuda12] and flax alone.
        "gpu": ["jax[cuda12]>=0.6"],
        # scripts/mutation_test.sh (docs/design/testing.md); not installed by CI.
        "mutation": ["mutmut>=3.3"],
    },
    entry_points={
        "console_scripts": [
            "topk-train=topk_transformers.commands.train:main",
            "topk-eval=topk_transformers.commands.eval:main",
            "topk-decode=topk_transformers.commands.decode:main",
            "topk-sparsity=topk_transformers.commands.sparsity:main",
            "topk-model-info=topk_transformers.commands.model_info:main",
            "topk-bench-decode=topk_transformers.commands.bench_decode:main",
            "topk-train-predictors=topk_transformers.commands.train_predictors:main",
            "topk-bench-train=topk_transformers.commands.bench_train:main",
            "topk-robustness-table=topk_transformers.commands.robustness_table:main",
            "topk-convert=topk_transformers.commands.convert:main",
            "topk-topk-sweep=topk_transformers.commands.topk_sweep:main",
            "topk-launch=topk_transformers.commands.launch:main",
        ],
    },
)
