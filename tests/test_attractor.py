"""The attractor branch (megamem/model/branches/attractor.py) against independent references: a float64
loop over the recurrence C_t = α·C_{t−1} + u_t ⊗ e_t, the model's own full forward (causality, decoding,
packed documents), the model without the branch (zero init) and a real training run."""
import math
import os

import pytest
import torch

from megamem.model import build_model
from megamem.model.branches import attractor as attractor_module
from megamem.model.context import ForwardContext
from megamem.model.decoding_cache import DecodingCache

from conftest import assert_future_never_changes_the_past, decode_in_chunks, tiny_config
from dist_utils import run_ranks
from synthetic_data import factory
from test_train import ZERO, make_cfg

torch.set_num_threads(1)
IDS = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(0))
POLICIES = {"fixed": 0.9, "exp_c_over_N": None, "learned": 0.8}
ON = ("model.attractor.use_attractor=true",)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 7 tokens, so every sequence here crosses chunk boundaries (the recurrence between chunks)."""
    monkeypatch.setattr(attractor_module, "CHUNK", 7)


def make(*overrides, seed=0, kick=True):
    """A tiny model with the attractor; kick: random output layers (a fresh branch adds exactly zero)."""
    torch.manual_seed(seed)
    model = build_model(tiny_config("memory.wo_init_zero=false", *ON, *overrides)).eval()
    if kick:
        with torch.no_grad():
            for branch in branches(model):
                for layer in branch.output_layers():
                    layer.weight.normal_(std=0.3)
    return model


def branches(model):
    return [b.attractor for b in model.blocks if b.attractor is not None]


def spiral_reference(n: int, dim: int) -> torch.Tensor:
    """e_n = sqrt(2/dim)·[cos(k·φ_n), sin(k·φ_n)], φ_n = 2π·frac(n·π) (float64 is exact enough for n < 100)."""
    phase = 2 * math.pi * math.modf(n * math.pi)[0]
    k = torch.arange(1, dim // 2 + 1, dtype=torch.float64)
    return math.sqrt(2 / dim) * torch.cat(((k * phase).cos(), (k * phase).sin()))


def loop_reference(branch, h, alpha, doc=None):
    """Position t reads C_{t−1}, then C_t = α·C_{t−1} + u_t ⊗ e_t (reset where a new document starts)."""
    B, S, D = h.shape
    W = {n: p.detach().double() for n, p in branch.named_parameters()}
    hn = branch.norm.double()(h)
    u = hn @ W["u_proj.weight"].T
    C, out = torch.zeros(B, W["u_proj.weight"].shape[0], D, dtype=torch.float64), []
    for t in range(S):
        if doc is not None and t > 0:
            C = C * (doc[:, t] == doc[:, t - 1]).double()[:, None, None]
        if branch.inject == "residual":
            r = torch.einsum("bid,bd->bi", C, hn[:, t] @ W["q_proj.weight"].T)
            out.append(r @ W["o_proj.weight"].T)
        else:
            H = branch.attn.num_heads
            hd = D // H
            q = (hn[:, t] @ W["attn.q_proj.weight"].T).view(B, H, hd)
            k = (C @ W["attn.k_proj.weight"].T).view(B, -1, H, hd)
            v = (C @ W["attn.v_proj.weight"].T).view(B, -1, H, hd)
            p = (torch.einsum("bhd,bihd->bhi", q, k) / math.sqrt(hd)).softmax(-1)
            y = torch.einsum("bhi,bihd->bhd", p, v).reshape(B, D)
            out.append(y @ W["attn.o_proj.weight"].T)
        C = alpha * C + torch.einsum("bi,d->bid", u[:, t], spiral_reference(t, D))
    return torch.stack(out, 1), C


@pytest.mark.parametrize("inject", ["cross_attn", "residual"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_parallel_chunks_equal_the_recurrence(policy, inject):
    over = [f"model.attractor.alpha_policy={policy}", f"model.attractor.attractor_inject={inject}",
            "model.attractor.d_state=6", "model.max_seq_len=128"]
    if POLICIES[policy] is not None:
        over.append(f"model.attractor.alpha_value={POLICIES[policy]}")
    branch = branches(make(*over))[0].double()
    alpha = branch.log_alpha().exp().item()  # learned: sigmoid of the float32-stored logit(0.8)
    assert math.isclose(alpha, {"fixed": 0.9, "exp_c_over_N": math.exp(-math.pi / 128), "learned": 0.8}[policy],
                        rel_tol=1e-12 if policy != "learned" else 1e-6)
    h = torch.randn(2, 30, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    doc = torch.tensor([[0] * 30, [0] * 11 + [1] * 12 + [2] * 7])  # boundaries inside and at chunk edges
    ctx = ForwardContext(positions=torch.arange(30), document_mask=None)
    ref, _ = loop_reference(branch, h, alpha)
    torch.testing.assert_close(branch(h, ctx), ref, rtol=1e-10, atol=1e-12)
    from megamem.model.attention.masks import document_mask
    ref, _ = loop_reference(branch, h, alpha, doc)
    out = branch(h, ForwardContext(positions=torch.arange(30), document_mask=document_mask(doc)))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert ref.abs().max() > 1e-3  # the read is not trivially zero


MODELS = {
    "rope+cross": [], "rope+residual": ["model.attractor.attractor_inject=residual"],
    "no bank": ["memory.vanilla_mode=true"],
    "pi_spiral": ["model.pos_encoding.type=pi_spiral", "model.attractor.inject_layers=last_N",
                  "model.attractor.N_inject=2"],
    "hybrid+learned": ["model.pos_encoding.type=hybrid", "model.pos_encoding.hybrid_K=16",
                       "model.pos_encoding.transition_width=4", "model.attractor.alpha_policy=learned",
                       "model.attractor.inject_layers=[1, 3]", "model.attractor.attractor_inject=residual"],
}


@pytest.mark.parametrize("name", list(MODELS))
def test_future_tokens_never_change_the_past(name):
    assert_future_never_changes_the_past(make(*MODELS[name]), IDS, 25, 61)


@pytest.mark.parametrize("name", list(MODELS))
def test_decoding_equals_the_full_forward_with_a_flat_state(name):
    model = make(*MODELS[name])
    full = model(IDS).logits
    for chunks in ([1] * 40, [5, 1, 9, 3, 12, 10]):
        sizes = []
        cached = decode_in_chunks(model, IDS, chunks, DecodingCache(max_len=64), lambda cache: sizes.append(
            sum(c.state["attractor"].numel() for c in cache.layers.values() if "attractor" in c.state)))
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        d_state = branches(model)[0].d_state
        assert sizes == [len(branches(model)) * 2 * d_state * 32] * len(chunks)  # O(1): B × d_state × D per layer


def test_sequences_and_packed_documents_do_not_share_state():
    model = make()
    both = model(IDS).logits
    torch.testing.assert_close(both[1:], model(IDS[1:]).logits, rtol=1e-5, atol=1e-6)
    ids, doc = IDS[:1, :30], torch.tensor([[0] * 13 + [1] * 17])
    packed = model(ids, document_ids=doc).logits
    other = ids.clone()
    other[:, :13] = (other[:, :13] + 3) % 61  # another first document
    torch.testing.assert_close(packed[:, 13:], model(other, document_ids=doc).logits[:, 13:], rtol=0, atol=0)
    torch.testing.assert_close(packed[:, :13], model(ids[:, :13]).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inject", ["cross_attn", "residual"])
def test_fresh_attractor_changes_nothing_and_one_step_changes_the_output(inject):
    over = (f"model.attractor.attractor_inject={inject}",)
    torch.manual_seed(0)
    model = build_model(tiny_config(*ON, *over))  # memory.wo_init_zero stays true; the branch is zero anyway
    for wo in ("true", "false"):
        plain = build_model(tiny_config(f"memory.wo_init_zero={wo}"))
        fresh = build_model(tiny_config(f"memory.wo_init_zero={wo}", *ON, *over))
        assert all(float(layer.weight.detach().abs().max()) == 0 for b in branches(fresh) for layer in b.output_layers())
        missing = fresh.load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert missing and all(".attractor." in k for k in missing)
        assert torch.equal(fresh(IDS).logits, plain(IDS).logits)
    plain = build_model(tiny_config())
    model.load_state_dict(plain.state_dict(), strict=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(IDS, labels=IDS).loss.backward()
    assert all(float(layer.weight.grad.abs().max()) > 0 for b in branches(model) for layer in b.output_layers())
    opt.step()
    with torch.no_grad():  # same weights elsewhere: drop the attractor's delta and compare
        stepped = model(IDS).logits
        for b in branches(model):
            for layer in b.output_layers():
                layer.weight.zero_()
        assert (stepped - model(IDS).logits).abs().max() > 1e-6


def test_exp_c_over_N_uses_max_seq_len_in_training_and_decoding():
    model = make("model.attractor.c_value=2.0", "model.attractor.d_state=4")
    branch = branches(model)[0]
    assert branch.log_alpha().item() == -2.0 / 64  # N = model.max_seq_len, not the forward's length
    full = model(IDS[:, :9]).logits  # a 9-token forward and a 40-token forward agree on their 9 tokens
    torch.testing.assert_close(full, model(IDS).logits[:, :9], rtol=1e-6, atol=1e-6)
    cache = DecodingCache(max_len=64)
    captured = {}
    branch.register_forward_hook(lambda m, a, out: captured.setdefault("h", []).append(a[0]))
    for t in range(12):  # the state after 12 decoded tokens is the float64 recurrence with α = e^{−2/64}
        model(IDS[:, t:t + 1], cache=cache)
    h = torch.cat(captured["h"], 1).double()
    _, C = loop_reference(branch, h, math.exp(-2.0 / 64))
    torch.testing.assert_close(cache.layer(0).state["attractor"].double(), C, rtol=1e-5, atol=1e-6)


def _fit(out):
    from megamem.train.trainer import Trainer

    cfg = make_cfg(out, "training.batch_size=2", "training.max_steps=12", "training.memory_lr=0.01",
                   "training.learning_rate=0.01", *ON, "model.attractor.alpha_policy=learned")
    trainer = Trainer(cfg, ZERO[0], factory(61, 2, 16))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".attractor." in n}
    result = trainer.fit()
    after = dict(trainer.model.named_parameters())
    result["moved"] = {n: float((after[n].detach() - p).abs().max()) for n, p in before.items()}
    result["groups"] = {g["name"]: sorted(g["param_names"]) for g in trainer.groups}
    return result


def test_a_training_run_trains_the_attractor(tmp_path):
    result = run_ranks(_fit, str(tmp_path / "run"), world_size=1, tmp_path=tmp_path / "r")[0]
    losses = result["train_losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert result["moved"] and all(v > 0 for v in result["moved"].values())  # every attractor parameter trained
    memory = {n for g, names in result["groups"].items() if g.startswith("memory") for n in names}
    assert set(result["moved"]) <= memory  # param_group "memory": memory_lr


def test_export_and_reload_keep_the_attractor(tmp_path):
    from transformers import AutoModelForCausalLM

    from megamem.hf.folder import write_megamem_folder
    from megamem.hf.load import load_exported

    over = ("model.attractor.alpha_policy=learned", "model.attractor.inject_layers=last_N",
            "model.attractor.N_inject=2")
    model, cfg = make(*over), tiny_config("memory.wo_init_zero=false", *ON, *over)
    os.makedirs(tmp_path / "hf")
    write_megamem_folder(str(tmp_path / "hf"), model.state_dict(), cfg, "fp32")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    ids = IDS % 58 + 3  # no pad token (0): HF generate would read it as padding
    with torch.no_grad():
        ref = model(ids).logits
        assert (hf(ids).logits - ref).abs().max() <= 1e-5
        assert (load_exported(str(tmp_path / "hf"))[0](ids).logits - ref).abs().max() <= 1e-5
    theirs = hf.generate(ids[:, :4], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs, model.generate(ids[:, :4], 8))


def test_pipeline_stages_run_the_attractor(tmp_path):
    """BlockPipe runs Block.forward with its ForwardContext: two stages train as the plain model does."""
    from test_pipeline import STAGES, ZERO1, _check_against_plain, _plain_and_pipeline

    extra = (*ON, "model.attractor.alpha_policy=learned", "model.attractor.attractor_inject=residual")
    plain, pipe = _plain_and_pipeline(tmp_path, extra, ZERO1, STAGES)
    _check_against_plain(plain, pipe, recompute=False)
