#!/usr/bin/env python
"""Generate text with a trained megamem model, streaming tokens to stdout.

    python scripts/inference.py --model outputs/run/final --prompt "In the beginning" [--max-new-tokens 64]
    python scripts/inference.py --model hf/run --prompt-file prompts.txt --temperature 0      # one prompt per line
    python scripts/inference.py --model outputs/run/checkpoints                              # interactive

--model: output_dir/final, a checkpoint (output_dir/checkpoints or stepN), or a Hugging Face folder
(tools/convert_to_hf.py). With a chat template (instruction-finetuned runs, or --chat-template on)
the prompt is a user message and an interactive session keeps the conversation.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402
from megamem.config import ConfigError  # noqa: E402

def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="output_dir/final, a checkpoint, or a Hugging Face folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt (without --prompt or --prompt-file: interactive)")
    src.add_argument("--prompt-file", help="a text file, one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routing-strategy", choices=["sequence", "rolling", "token"],
                   help="chapter models: how generate() routes (default: the model's config)")
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="auto: use the tokenizer's chat template unless the model is a pretraining run")
    p.add_argument("--system", help="a system message (chat template only)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0 (0 = greedy)")
    return args


def encode(tokenizer, messages, use_template: bool):
    """Prompt ids [1, S]: the chat template over the conversation, or the last message as raw text."""
    import torch

    if use_template:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return torch.tensor([out["input_ids"]])
    return torch.tensor([tokenizer.encode(messages[-1]["content"], add_special_tokens=False)])


def generate(loaded, tokenizer, ids, args):
    """Stream the new tokens of one prompt to stdout; returns the new token ids."""
    import torch
    from transformers import TextStreamer

    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty")
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cfg = loaded.hf.generation_config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (tokenizer.pad_token_id or eos)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sample, eos_token_id=eos, pad_token_id=pad,
                  repetition_penalty=args.repetition_penalty, streamer=streamer, attention_mask=torch.ones_like(ids))
    if sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    with torch.no_grad():
        return loaded.hf.generate(ids, **kwargs)[0, ids.shape[1]:]


def prompts(args):
    if args.prompt is not None:
        yield args.prompt
    elif args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise ConfigError(f"--prompt-file {args.prompt_file} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
    else:
        print("interactive: type a prompt, an empty line or Ctrl-D ends", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                return
            if not line.strip():
                return
            yield line


def main(argv=None) -> int:
    from megamem.eval import load_any
    from megamem.hf.convert import DTYPES

    args = parse_args(argv)
    loaded = load_any(args.model, DTYPES[args.dtype], args.routing_strategy)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise ConfigError(f"{args.model}: no tokenizer saved with the model; cannot turn a prompt into tokens")
    use_template = args.chat_template == "on" or args.chat_template == "auto" and (
        loaded.cfg is None or loaded.cfg.training.training_mode == "instruction_finetuning")
    if use_template and not getattr(tokenizer, "chat_template", None):
        if args.chat_template == "on":
            raise ConfigError(f"--chat-template on: the tokenizer of {args.model} has no chat template")
        use_template = False
    chat = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.prompt is None and args.prompt_file is None
    for text in prompts(args):
        messages = chat + [{"role": "user", "content": text}]
        new = generate(loaded, tokenizer, encode(tokenizer, messages, use_template), args)
        if interactive:  # the conversation goes on
            chat = messages + [{"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)}]
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
