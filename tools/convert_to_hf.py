#!/usr/bin/env python
"""Convert a megamem training output to a Hugging Face model folder.

    python tools/convert_to_hf.py --checkpoint outputs/run/final --output hf/run [--dtype bf16] [--force]

--checkpoint takes an exported folder (output_dir/final) or a DeepSpeed checkpoint of any ZeRO
stage, pipeline or expert-parallel layout (output_dir/checkpoints, or one stepN folder). Models that
are exactly Llama (or, with MLA attention, exactly DeepSeek-V3) become native LlamaForCausalLM
(DeepseekV3ForCausalLM) folders (no remote code; --format llama / deepseek_v3 insists, --format
megamem declines); every other model a folder with remote code that loads with
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) (or without it after `import
megamem`); adapter runs base + adapter, or with --merge-lora (LoRA only) the merged base model.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402


def main(argv=None) -> int:
    from megamem.hf.convert import DTYPES, FORMATS, convert_to_hf

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="output_dir/final, output_dir/checkpoints or a stepN folder")
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")
    p.add_argument("--routing-strategy", choices=["sequence", "rolling", "token"],
                   help="chapter models: the routing generate() uses by default (else the training config's)")
    p.add_argument("--max-shard-size", default="5GB", help="larger weights are split into shards of this size")
    p.add_argument("--merge-lora", action="store_true", help="adapter runs with LoRA only: merge it into the base")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="auto: native Llama / DeepSeek-V3 for models that are exactly one, else megamem's format; "
                        "llama, deepseek_v3: that native format or refuse; megamem: always megamem's format "
                        "(remote code)")
    args = p.parse_args(argv)
    out = convert_to_hf(args.checkpoint, args.output, args.dtype, args.force, args.routing_strategy,
                        args.max_shard_size, args.merge_lora, args.format)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
