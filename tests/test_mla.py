"""Multi-head latent attention (model.attention_type: mla) against independent references: a hand-written
MLA (explicit softmax, pairwise RoPE), transformers' DeepSeek-V3 attention with copied weights, the model's
own full forward for every decoding path (also after weights change), and hand counts of cache bytes/FLOPs."""
import json
import math

import pytest
import torch

from megamem.config import ConfigError
from megamem.model import build_model
from megamem.model.attention.mla import CACHE_KEY, MultiHeadLatentAttention
from megamem.model.context import ForwardContext
from megamem.model.decoding_cache import DecodingCache
from megamem.model.positions import POSITIONS, PositionEncoding

from conftest import decode_in_chunks, tiny_config

DC, DR, DN, DV = 12, 6, 8, 10  # kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim
MLA = ("model.attention_type=mla", "model.num_kv_heads=null", f"model.mla_config.kv_lora_rank={DC}",
       f"model.mla_config.qk_rope_head_dim={DR}", f"model.mla_config.qk_nope_head_dim={DN}",
       f"model.mla_config.v_head_dim={DV}")
Q_LORA = {"plain-q": (), "low-rank-q": ("model.mla_config.q_lora_rank=16",)}


def mla_cfg(*extra):
    return tiny_config(*MLA, *extra)


def module(*extra, seed=0):
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(mla_cfg(*extra).model, 0).eval()  # nn.Linear's own (wide) init


def rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_pairs(x, positions, theta):
    """RoPE written out per pair (i, i + d/2), angle = position · theta^(-2i/d)."""
    d = x.shape[-1]
    half = d // 2
    angle = positions.double()[:, None] * theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def reference(attn, x, positions, allowed, rotate=True, theta=10000.0):
    """MLA from its equations; allowed: [S, S] or [B, 1, S, S] bool."""
    B, S, _ = x.shape
    H = attn.num_heads
    if attn.q_lora_rank:
        q = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight) @ attn.q_b_proj.weight.T
    else:
        q = x @ attn.q_proj.weight.T
    q = q.view(B, S, H, DN + DR)
    c, kr = (x @ attn.kv_a_proj_with_mqa.weight.T).split([DC, DR], dim=-1)
    c = rms(c, attn.kv_a_layernorm.weight)
    qr = q[..., DN:]
    if rotate:
        qr = rope_pairs(qr.transpose(1, 2), positions, theta).transpose(1, 2)
        kr = rope_pairs(kr, positions, theta)
    kv = (c @ attn.kv_b_proj.weight.T).view(B, S, H, DN + DV)
    scores = torch.einsum("bshd,bthd->bhst", q[..., :DN], kv[..., :DN]) + torch.einsum("bshd,btd->bhst", qr, kr)
    scores = (scores / math.sqrt(DN + DR)).masked_fill(~allowed, float("-inf"))
    o = torch.einsum("bhst,bthv->bshv", scores.softmax(-1), kv[..., DN:]).reshape(B, S, H * DV)
    return o @ attn.o_proj.weight.T


def causal(S):
    return torch.ones(S, S, dtype=torch.bool).tril()


# ----------------------------------------------------------------------------- the attention itself
@pytest.mark.parametrize("q", list(Q_LORA))
def test_naive_and_absorbed_equal_the_equations(q):
    attn = module(*Q_LORA[q])
    x, pos = torch.randn(2, 9, 32), torch.arange(9)
    ref = reference(attn, x, pos, causal(9))
    with torch.no_grad():
        naive = attn(x, ForwardContext(positions=pos), absorbed=False)
        absorbed = attn(x, ForwardContext(positions=pos), absorbed=True)
        default = attn(x, ForwardContext(positions=pos))
    assert (naive - ref).abs().max() <= 1e-5 and (absorbed - ref).abs().max() <= 1e-5
    assert (absorbed - naive).abs().max() <= 1e-5 and torch.equal(default, naive)  # training/prefill: naive
    # decoding through the latent cache (absorbed after the first chunk) gives the same rows
    cache, rows = DecodingCache(9, capacity=2), []
    with torch.no_grad():
        for a, b in ((0, 4), (4, 5), (5, 8), (8, 9)):
            rows.append(attn(x[:, a:b], ForwardContext(positions=torch.arange(a, b), cache=cache)))
            cache.advance(b - a)
    assert (torch.cat(rows, 1) - ref).abs().max() <= 1e-5


def test_document_mask_and_positions_none():
    attn = module("model.pos_encoding.type=none")
    assert not attn.rotate
    x, pos = torch.randn(2, 8, 32), torch.arange(8)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    allowed = ((doc[:, :, None] == doc[:, None, :]) & causal(8))[:, None]
    ref = reference(attn, x, pos, allowed, rotate=False)
    with torch.no_grad():
        for absorbed in (False, True):
            out = attn(x, ForwardContext(positions=pos, document_mask=allowed), absorbed=absorbed)
            assert (out - ref).abs().max() <= 1e-5


def test_rope_theta_defaults_to_the_model_and_can_differ():
    assert module("model.rope_theta=500").theta == 500.0
    attn = module("model.mla_config.rope_theta=50")
    x, pos = torch.randn(1, 6, 32), torch.arange(6)
    with torch.no_grad():
        out = attn(x, ForwardContext(positions=pos))
    assert (out - reference(attn, x, pos, causal(6), theta=50.0)).abs().max() <= 1e-5


def test_an_encoding_that_rotates_full_heads_is_refused(monkeypatch):
    class FullRotation(PositionEncoding):
        def __init__(self, model):
            super().__init__()

        def rotate(self, q, k, state, ctx):
            return q, k

    monkeypatch.setitem(POSITIONS.entries, "rotating", FullRotation)
    with pytest.raises(ConfigError, match=r"^model.pos_encoding.type: 'rotating' rotates queries/keys at the model's "
                                          r"head width, which attention_type mla does not have; use rope"):
        build_model(mla_cfg("model.pos_encoding.type=rotating"))


# ------------------------------------------------------------------------- transformers' DeepSeek-V3
@pytest.mark.parametrize("interleave", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("q", list(Q_LORA))
def test_equals_transformers_deepseek_v3_attention(q, interleave):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    ours = module(*Q_LORA[q])
    config = DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=DC,
                              q_lora_rank=16 if q == "low-rank-q" else None, qk_rope_head_dim=DR,
                              qk_nope_head_dim=DN, v_head_dim=DV, rope_interleave=interleave, rms_norm_eps=1e-6,
                              max_position_embeddings=64, attention_bias=False, attn_implementation="eager")
    assert config.rope_parameters["rope_type"] == "default" and config.rope_parameters["rope_theta"] == 10000.0
    theirs = DeepseekV3Attention(config, 0).eval()
    state = ours.state_dict()
    if interleave:  # HF's rope rows in interleaved order: its row perm[j] is our (rotate-half) row j
        perm = torch.cat([torch.arange(0, DR, 2), torch.arange(1, DR, 2)])
        inv = torch.argsort(perm)
        name = "q_b_proj.weight" if q == "low-rank-q" else "q_proj.weight"
        w = state[name].view(4, DN + DR, -1).clone()
        w[:, DN:] = w[:, DN:][:, inv]
        state[name] = w.reshape(state[name].shape)
        w = state["kv_a_proj_with_mqa.weight"].clone()
        w[DC:] = w[DC:][inv]
        state["kv_a_proj_with_mqa.weight"] = w
    theirs.load_state_dict(state, strict=True)
    x, pos = torch.randn(2, 11, 32), torch.arange(11)
    cos, sin = DeepseekV3RotaryEmbedding(config)(x, pos[None])
    mask = torch.zeros(11, 11).masked_fill(~causal(11), float("-inf"))[None, None]
    with torch.no_grad():
        expected = theirs(x, (cos, sin), mask)[0]
        naive = ours(x, ForwardContext(positions=pos), absorbed=False)
        absorbed = ours(x, ForwardContext(positions=pos), absorbed=True)
    assert (naive - expected).abs().max() <= 1e-5
    assert (absorbed - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ the whole model
MEMORY = ("memory.wo_init_zero=false", "memory.memory_layer_placement=every_n", "memory.memory_layer_n=2")


def mla_model(*extra, seed=0):
    torch.manual_seed(seed)
    return build_model(mla_cfg(*MEMORY, *extra)).eval()


def decode(model, ids, chunks, capacity=3):
    """Logits of ids fed in chunks of the given sizes through one decoding cache."""
    cache = model.new_cache(ids.shape[0], ids.shape[1], capacity)
    return decode_in_chunks(model, ids, chunks, cache), cache


@pytest.mark.parametrize("q", list(Q_LORA))
def test_decoding_equals_the_full_forward_also_after_an_optimizer_step(q):
    model = mla_model(*Q_LORA[q])
    assert len(model.memory_layers) == 2 and all(type(b.attn) is MultiHeadLatentAttention for b in model.blocks)
    ids = torch.randint(3, 61, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    for chunks in ([5] + [1] * 9, [4, 3, 1, 6], [14]):
        assert (decode(model, ids, chunks)[0] - full).abs().max() <= 1e-5, chunks
    # a training step between generations: the new generation reads the new weights
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        stepped = model(ids).logits
    assert (stepped - full).abs().max() > 1e-3
    assert (decode(model, ids, [5] + [1] * 9)[0] - stepped).abs().max() <= 1e-5
    # weights changed in mid-generation: the cached latents of the last layer stay valid (its inputs are
    # unchanged), and its W_UK/W_UV, queries and output are read live
    last = model.blocks[-1].attn
    cache = model.new_cache(2, 14)
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
        for p in (last.kv_b_proj.weight, last.o_proj.weight, model.lm_head.weight):
            p.add_(torch.randn_like(p) * 0.05)
        rest = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(6, 14)], 1)
        fresh = model(ids).logits[:, 6:]
    assert (rest - fresh).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_the_cache_holds_only_the_latent_and_the_rope_key(dtype, size):
    model = mla_model().to(dtype)
    ids = torch.randint(3, 61, (2, 7))
    inputs = {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, b in enumerate(model.blocks)]
    _, cache = decode(model, ids, [7], capacity=7)
    for h in hooks:
        h.remove()
    for i, block in enumerate(model.blocks):
        layer = cache.layer(i)
        assert layer.keys is None and layer.values is None
        tensors = [v for v in layer.state.values() if torch.is_tensor(v)]
        assert len(tensors) == 1 and tensors[0] is layer.state[CACHE_KEY]
        latent = tensors[0]
        assert latent.shape == (2, 7, DC + DR) and latent.dtype == dtype
        assert latent.element_size() * latent.shape[-1] == (DC + DR) * size  # bytes per token and layer
        attn = block.attn  # what it holds: RMSNorm(c) and the rotated shared key, recomputed by hand
        c, kr = (inputs[i].float() @ attn.kv_a_proj_with_mqa.weight.float().T).split([DC, DR], dim=-1)
        want = torch.cat([rms(c, attn.kv_a_layernorm.weight.float()), rope_pairs(kr, torch.arange(7), 1e4)], -1)
        assert (latent.float() - want).abs().max() <= (1e-5 if dtype == torch.float32 else 0.05)


def test_generate_grows_the_latent_cache_and_matches_greedy_full_forwards():
    model = mla_model()
    prompt = torch.randint(3, 61, (2, 4))
    out = model.generate(prompt, 10)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):  # greedy by full forwards, no cache
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_causal_and_document_masks():
    model = mla_model()
    ids = torch.randint(3, 61, (2, 12))
    with torch.no_grad():
        base = model(ids).logits
        changed = ids.clone()
        changed[:, 7:] = torch.randint(3, 61, (2, 5))
        assert torch.equal(model(changed).logits[:, :7], base[:, :7])
        docs = torch.tensor([[0] * 5 + [1] * 7] * 2)
        packed = model(ids, document_ids=docs).logits
        assert (packed[:, :5] - base[:, :5]).abs().max() <= 1e-6
        alone = model(ids[:, 5:]).logits  # the second document by itself (RoPE: only offsets matter)
        assert (packed[:, 5:] - alone).abs().max() <= 1e-5


def test_flops_count_mla_widths():
    from megamem.model.flops import flops_per_token

    model = mla_model()
    per_token = 6 / 2 * model.model_config.num_layers * 4 * (DN + DR + DV)  # QKᵀ and PV, per context token
    assert flops_per_token(model, 40) - flops_per_token(model, 24) == pytest.approx(16 * per_token)
    mha = build_model(tiny_config(*MEMORY))
    assert flops_per_token(mha, 40) - flops_per_token(mha, 24) == pytest.approx(16 * 6 / 2 * 4 * 2 * 32)


def assert_folder_equals_model(folder, model):
    """The HF folder (remote code) and megamem's reader give the model's logits; HF generate its greedy tokens."""
    from transformers import AutoModelForCausalLM

    from megamem.hf.load import load_exported

    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(3, 61, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        assert (hf(ids).logits - ref).abs().max() <= 1e-5
        back, _, _ = load_exported(folder)
        assert (back(ids).logits - ref).abs().max() <= 1e-5
    theirs = hf.generate(ids[:, :4], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs, model.generate(ids[:, :4], 6))


def test_exports_in_the_megamem_format_not_as_llama(tmp_path):
    from megamem.hf.llama import llama_incompatibilities
    from test_hf_megamem import hf_folder

    model = mla_model("model.mla_config.q_lora_rank=16")
    cfg = mla_cfg(*MEMORY, "memory.vanilla_mode=true", "model.mla_config.q_lora_rank=16")
    assert any(p.startswith("model.attention_type is 'mla'") for p in llama_incompatibilities(cfg))
    folder = hf_folder(model, mla_cfg(*MEMORY, "model.mla_config.q_lora_rank=16"), tmp_path / "hf")
    assert_folder_equals_model(folder, model)


# --------------------------------------------------------------------------------------- training
def _mla_run(out, ds, extra):
    """Train (ZeRO-3, one rank), then decode with the trained, partitioned model against its full forward."""
    from megamem.train.trainer import Trainer
    from synthetic_data import factory
    from test_train import make_cfg

    cfg = make_cfg(out, "training.batch_size=2", "training.max_steps=6", "training.save_steps=3",
                   "training.learning_rate=0.01", "memory.memory_layer_placement=every_n", "memory.memory_layer_n=2",
                   *MLA, *extra)
    trainer = Trainer(cfg, ds, factory(61, 2, 16))
    result = trainer.fit()
    result["base"] = sorted(trainer.groups[0]["param_names"])
    model = trainer.model.eval()
    ids = torch.randint(3, 61, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the absorbed form reads kv_b_proj's weight: ZeRO-3 must gather it
        result["decode_gap"] = (decode(model, ids, [4] + [1] * 6)[0] - model(ids).logits).abs().max().item()
    return result


def test_trains_under_zero3_resumes_exactly_and_decodes(tmp_path):
    from dist_utils import run_ranks
    from test_train import ZERO

    ds = json.load(open(ZERO[3]))
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every weight partitioned, even tiny ones
    ds_path = tmp_path / "zero3.json"
    ds_path.write_text(json.dumps(ds))
    full = run_ranks(_mla_run, str(tmp_path / "a"), str(ds_path), (), world_size=1, tmp_path=tmp_path / "r1")[0]
    losses = full["train_losses"]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    assert full["decode_gap"] <= 1e-5
    resumed = run_ranks(_mla_run, str(tmp_path / "a"), str(ds_path), ("training.resume_from_checkpoint=" + str(
        tmp_path / "a" / "checkpoints" / "step00000003"),), world_size=1, tmp_path=tmp_path / "r2")[0]
    assert torch.allclose(torch.tensor(resumed["train_losses"]), torch.tensor(losses[3:]), atol=1e-6, rtol=0)
    assert "blocks.0.attn.kv_b_proj.weight" in full["base"]


def test_pipeline_stages_match_the_plain_model(tmp_path):
    """Two pipeline stages (2 ranks, each holding MLA blocks and a memory layer) train like the plain model."""
    from test_pipeline import STAGES, ZERO1, _check_against_plain, _plain_and_pipeline

    plain, pipe = _plain_and_pipeline(tmp_path, (*MLA, "training.learning_rate=0.01"), ZERO1, STAGES)
    _check_against_plain(plain, pipe, recompute=False)


def test_peer_and_mla_with_memory_export_and_decode(tmp_path):
    """The PEER + MLA trainer's model (configs/peer_mla_small.yaml's parts) with a memory bank: the HF
    folder (remote code) gives the same logits and greedy tokens, and megamem reads it back."""

    from test_hf_megamem import hf_folder

    parts = (*MEMORY, "model.mla_config.q_lora_rank=16", "model.use_peer=true", "model.peer_layer_placement=custom",
             "model.peer_layer_indices=[1, 2]", "model.peer_config.num_experts=64",
             "model.peer_config.product_key_dim=[8, 8]", "model.peer_config.num_experts_per_tok=4",
             "model.peer_config.num_heads=2", "model.peer_config.query_dim=16")
    cfg = mla_cfg(*parts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert type(model.blocks[1].mlp).__name__ == "PEER" and model.blocks[1].memory is not None
    folder = hf_folder(model, cfg, tmp_path / "hf")
    assert_folder_equals_model(folder, model)
