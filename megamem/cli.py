"""Shared pieces of the command-line scripts: user-error handling and the parameter report."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

import torch

from .config import ConfigError, MegamemConfig


class ArgumentParser(argparse.ArgumentParser):
    """argparse with megamem's user-error contract: one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main: Callable[[], int]) -> int:
    """Run a script's main; a user error becomes one line on stderr and exit code 2, no traceback."""
    try:
        return main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _adapter_on_meta(cfg: MegamemConfig):
    """The adapter model on the meta device from the base's config alone, or a line saying why not.

    Never downloads: the base must be a local folder or already in the Hugging Face cache.
    """
    from .adapter import build_adapter_model
    from .adapter.base import base_config, empty_base

    try:
        hf_config = base_config(cfg.model.base_model_name, local_only=True)
    except ConfigError as e:
        return None, (f"# parameters\nnot counted: {e}; a dry run does not download. Counts appear once the model "
                      "is in a local folder or the Hugging Face cache.")
    with torch.device("meta"):
        model = build_adapter_model(cfg, base=empty_base(hf_config))
    lines = [f"base model: {cfg.model.base_model_name} ({hf_config.model_type}, {model.dims.num_layers} layers, "
             f"hidden {model.dims.hidden_size}), frozen: {cfg.model.freeze_base_model}"]
    if cfg.model.load_in_4bit:
        from .adapter.base import quantization_config

        try:
            quantization_config(cfg)
            lines.append("base weights: 4-bit NF4 (bitsandbytes)")
        except ConfigError as e:
            lines.append(f"warning: training would stop here: {e}")
    return model, "\n".join(lines)


def parameter_report(cfg: MegamemConfig, bank_shards: int = 1) -> str:
    """Parameter counts of the model a config describes, built on the meta device (no memory, instant).

    bank_shards > 1 (ZeRO-3 over that many ranks) adds each bank's bytes per rank at rest.
    """
    from .model import build_model
    from .model.mlp.peer import peer_modules

    header = []
    if cfg.model.base_model_name is not None:
        model, note = _adapter_on_meta(cfg)
        if model is None:
            return note
        header = [note]
    else:
        with torch.device("meta"):
            model = build_model(cfg)
    from .train.trainable import apply_training_policy

    with torch.device("meta"):  # LoRA and the trainable policy, as the trainer applies them
        policy = apply_training_policy(model, cfg)
    counts = {**model.parameter_counts(), "lora": policy["lora"], "trainable": policy["trainable"]}
    lines = ["# parameters", *header,
             f"total:     {counts['total']:>14,}  ({_fmt(counts['total'])})",
             f"memory:    {counts['memory']:>14,}  ({_fmt(counts['memory'])})",
             *([f"lora:      {counts['lora']:>14,}  ({_fmt(counts['lora'])})"] if counts.get("lora") else []),
             f"trainable: {counts['trainable']:>14,}  ({_fmt(counts['trainable'])})",
             *([f"trunk held at {cfg.training.quantization_type}: {policy['trunk_parameters']:,} frozen parameters, "
                f"{_fmt(policy['trunk_bytes'])} bytes (fp32: {_fmt(policy['trunk_bytes_fp32'])})"]
               if policy.get("trunk_parameters") else []),
             f"memory layers: {model.memory_layers or 'none'}"]
    peers = peer_modules(model)  # PEER layers: product-key expert retrieval in place of the MLP
    lines.append(f"peer layers: {sorted(peers) or 'none'}")
    for i, peer in sorted(peers.items()):
        n = sum(p.numel() for p in peer.parameters())
        neurons = f"{peer.expert_hidden} neuron{'s' if peer.expert_hidden != 1 else ''}"
        lines.append(f"peer layer {i}: {peer.num_experts:,} experts of {neurons} "
                     f"(product keys {' x '.join(map(str, peer.sizes))}), {peer.heads} heads x {peer.k} experts per "
                     f"token, {n:,} parameters ({_fmt(n)})")
    for i, bank in enumerate(counts["banks"]):
        lines.append(f"bank {i}: {bank['kind']}, {bank['tokens']} tokens x {bank['dim']}, "
                     f"{bank['parameters']:,} parameters, {_fmt(bank['bytes'])} bytes, layers {bank['layers']}")
    if bank_shards > 1:
        for i, bank in enumerate(counts["banks"]):
            lines.append(f"bank {i}: {bank['parameters'] * 4 / bank_shards / 1e6:.2f} MB of fp32 parameters per rank "
                         f"at rest (1/{bank_shards} of {bank['parameters'] * 4 / 1e6:.2f} MB), gathered while the "
                         "forward uses it")
    return "\n".join(lines)
