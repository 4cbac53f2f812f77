"""scripts/inference.py and scripts/eval.py on a tiny exported model, against direct computations."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from data_utils import data_config, make_docs, tokenizer, write_jsonl

from conftest import ROOT
from megamem.config import ConfigError
from megamem.hf.convert import convert_to_hf
from megamem.model import build_model
from megamem.folders import export_model


def script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exported(tmp_path, *overrides):
    """(final, hf folder, model, cfg, tokenizer) of a tiny random model with a real tokenizer and eval data."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_docs(12, seed=3)])
    cfg = data_config(tmp_path, f"data.datasets=[{{path: {data}, eval_path: {data}}}]", "memory.wo_init_zero=false",
                      "model.max_seq_len=64", "training.batch_size=2", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tok = tokenizer()
    export_model(model.state_dict(), cfg, tok, str(tmp_path / "final"), 1)
    return str(tmp_path / "final"), convert_to_hf(str(tmp_path / "final"), str(tmp_path / "hf")), model, cfg, tok


def streamed(tok, tokens):
    """What streaming these tokens prints: a byte-fallback run that is not valid UTF-8 can differ from decoding
    them at once (a byte printed before the next one arrives)."""
    import contextlib
    import io

    from transformers import TextStreamer

    buf, streamer = io.StringIO(), TextStreamer(tok, skip_special_tokens=True)
    with contextlib.redirect_stdout(buf):
        for t in tokens:
            streamer.put(t.reshape(1))
        streamer.end()
    return buf.getvalue().rstrip("\n")


def test_inference_streams_greedy_tokens_of_megamem_generate(tmp_path, capsys):
    final, hf, model, cfg, tok = exported(tmp_path)
    inference = script("inference")
    prompts = ["the light of", "and water"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    want = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        out = model.generate(ids, 7, eos_token_id=cfg.model.eos_token_id)[0, ids.shape[1]:]
        want += streamed(tok, out).splitlines()
    for source in (final, hf):
        assert inference.main(["--model", source, "--prompt-file", str(tmp_path / "p.txt"), "--temperature", "0",
                               "--max-new-tokens", "7"]) == 0
        assert capsys.readouterr().out.splitlines() == want
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "the light"}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]])
    out = model.generate(ids, 5, eos_token_id=cfg.model.eos_token_id)[0, ids.shape[1]:]
    assert inference.main(["--model", final, "--prompt", "the light", "--temperature", "0", "--max-new-tokens", "5",
                           "--chat-template", "on"]) == 0
    assert capsys.readouterr().out.splitlines() == streamed(tok, out).splitlines()
    with pytest.raises(ConfigError, match="--chat-template on: the tokenizer of .* has no chat template"):
        inference.main(["--model", hf, "--prompt", "a", "--chat-template", "on"])  # a pretraining run's export


def test_eval_perplexity_equals_a_hand_computation(tmp_path, capsys):
    from megamem.data import build_loader

    final, hf, model, cfg, tok = exported(tmp_path, "data.document_masking=false")
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in build_loader(cfg, tok, "eval"):
            probs = model(batch["input_ids"]).logits.double().softmax(-1)
            for b, row in enumerate(batch["labels"].tolist()):
                for t in range(1, len(row)):
                    if row[t] != -100:
                        nll -= math.log(probs[b, t - 1, row[t]].item())
                        n += 1
    eval_ = script("eval")
    for source in (final, hf):
        extra = [] if source == final else ["--config", os.path.join(final, "config.yaml")]
        assert eval_.main(["--model", source, "--output", str(tmp_path / "r.json"), *extra]) == 0
        got = json.load(open(tmp_path / "r.json"))["perplexity"]
        assert got["tokens"] == n and abs(got["loss"] - nll / n) < 1e-6 and abs(got["ppl"] - math.exp(nll / n)) < 1e-4
    assert f"perplexity {math.exp(nll / n):.2f}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no config.yaml saying which data to evaluate on; pass --config"):
        eval_.main(["--model", hf])


def test_eval_chapter_usage_and_plot(tmp_path):
    from megamem.data import build_loader

    final, _, model, cfg, tok = exported(tmp_path, "memory.use_chapters=true", "memory.num_chapters=4",
                                         "memory.num_memory_tokens=16", "memory.top_k_chapters=2")
    counts = {}
    with torch.no_grad():
        for batch in build_loader(cfg, tok, "eval"):
            for layer, c in model(batch["input_ids"], document_ids=batch.get("document_ids")).chapter_usage.items():
                counts[layer] = counts.get(layer, 0) + c.double()
    assert script("eval").main(["--model", final, "--output", str(tmp_path / "r.json")]) == 0
    got = json.load(open(tmp_path / "r.json"))
    assert os.path.getsize(got["chapter_plot"]) > 0 and got["chapter_plot"].endswith("r.png")
    for layer, c in counts.items():
        shares = (c / c.sum()).tolist()
        entropy = -sum(p * math.log(p) for p in shares if p > 0) / math.log(4)
        assert got["chapter_usage"][str(layer)]["shares"] == pytest.approx(shares)
        assert got["chapter_usage"][str(layer)]["normalised_entropy"] == pytest.approx(entropy)


def test_lm_eval_needs_a_model_folder_and_the_package(tmp_path, monkeypatch):
    from megamem.eval.lm_eval_glue import run_lm_eval

    with pytest.raises(ConfigError, match="neither an export folder"):  # exports, checkpoints, HF folders
        run_lm_eval(str(tmp_path), ["megamem_mc"])
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval absent, whether or not this machine has it
    with pytest.raises(ConfigError, match=r"pip install 'megamem\[eval\]'"):
        run_lm_eval(str(tmp_path), ["arc_easy"])


def test_eval_expert_usage_and_plot(tmp_path, capsys):
    """PEER: selections counted over the eval split (even with log_expert_usage off) equal a brute-force top-k
    over all N expert scores of each PEER layer's inputs; summary, JSON and plot from those counts."""
    import itertools

    from megamem.data import build_loader
    from megamem.model.mlp.peer import peer_modules, usage_stats

    final, _, model, cfg, tok = exported(
        tmp_path, "model.use_peer=true", "model.peer_layer_placement=all", "model.peer_config.product_key_dim=[4, 5]",
        "model.peer_config.num_experts=20", "model.peer_config.num_experts_per_tok=3", "model.peer_config.num_heads=2",
        "model.peer_config.query_dim=8", "model.peer_config.batch_norm_query=false",
        "model.peer_config.log_expert_usage=false")
    peers, inputs = peer_modules(model), {}
    for layer, peer in peers.items():
        peer.register_forward_pre_hook(lambda m, a, layer=layer: inputs.setdefault(layer, []).append(a[0]))
    with torch.no_grad():
        for batch in build_loader(cfg, tok, "eval"):
            model(batch["input_ids"], document_ids=batch.get("document_ids"))
        counts = {}
        for layer, peer in peers.items():
            keys = torch.stack([torch.cat([k[i] for k, i in zip(peer.sub_keys(), idx)])
                                for idx in itertools.product(range(4), range(5))])  # [N, query_dim], ravel order
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[layer]])
            q = peer.query_norm(peer.query(x).view(-1, 2, 8))
            chosen = torch.einsum("thc,nc->thn", q, keys).topk(3, dim=-1).indices
            counts[layer] = torch.bincount(chosen.flatten(), minlength=20).double()
    assert script("eval").main(["--model", final, "--output", str(tmp_path / "r.json")]) == 0
    got = json.load(open(tmp_path / "r.json"))
    assert os.path.getsize(got["expert_plot"]) > 0 and got["expert_plot"].endswith("r_experts.png")
    assert sorted(got["expert_usage"]) == [str(layer) for layer in sorted(peers)] and len(peers) == 4
    for layer, c in counts.items():
        want = {**usage_stats(c, 5.0), "max_share": (c.max() / c.sum()).item()}
        assert got["expert_usage"][str(layer)] == pytest.approx(want)
    assert f"experts, layer 0: used {got['expert_usage']['0']['usage']:.3f}" in capsys.readouterr().out
