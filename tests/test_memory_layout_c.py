"""Layout C (memory.memory_block_variant: C): the memory read takes the place of the MLP of the layers that read it."""
import math

import pytest
import torch

from conftest import assert_future_never_changes_the_past, decode_in_chunks, tiny_config
from megamem.config import ConfigError
from megamem.eval.ablation import ablated
from megamem.model import build_model

C = ("memory.memory_block_variant=C", "memory.memory_layer_placement=every_n", "memory.memory_layer_n=2",
     "memory.wo_init_zero=false", "memory.memory_init_std=1.0")


def make(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_config(*overrides))


def reference_read(branch, bank, h):
    """float64 from the branch's weights: W_o · softmax(q kᵀ/√hd) v over every bank row, per head (q from the
    memory norm of the stream h, k and v projected from the bank)."""
    a = branch.attn
    H, hd = a.num_heads, a.head_dim
    w = {n: getattr(a, n).weight.double() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q = (branch.norm(h).double() @ w["q_proj"].T).view(*h.shape[:2], H, hd)
    k = (bank.double() @ w["k_proj"].T).view(-1, H, hd)
    v = (bank.double() @ w["v_proj"].T).view(-1, H, hd)
    weights = torch.einsum("bshd,nhd->bshn", q, k).div(math.sqrt(hd)).softmax(-1)
    return torch.einsum("bshn,nhd->bshd", weights, v).reshape(*h.shape[:2], H * hd) @ w["o_proj"].T


def test_layout_c_block_is_attention_then_memory_read_without_mlp():
    """A reading layer's block outputs x + attn + the float64 memory read of (x + attn), and nothing else (no
    MLP); the other layers keep theirs, and the model has exactly layout A's parameters less the replaced MLPs
    (and their norms)."""
    model = make(*C, "model.num_kv_heads=4")
    assert model.memory_layers == [1, 3]
    assert [b.mlp is None for b in model.blocks] == [False, True, False, True]
    seen = {}
    block = model.blocks[1]
    block.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    block.attn.register_forward_hook(lambda m, args, out: seen.update(attn=out))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
        h = seen["x"] + seen["attn"]
        want = h.double() + reference_read(block.memory, model.banks[0](), h)
    torch.testing.assert_close(seen["out"].double(), want, rtol=1e-5, atol=1e-5)
    a = make(*[o.replace("=C", "=A") for o in C], "model.num_kv_heads=4")
    replaced = sum(p.numel() for i in (1, 3) for m in (a.blocks[i].mlp, a.blocks[i].mlp_norm) for p in m.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in a.parameters()) - replaced


def test_layout_c_equals_layout_a_with_its_memory_layers_mlps_adding_zero():
    """Whole model: C's logits are those of the layout-A model holding the same weights whose reading layers'
    MLPs output zero (down_proj zeroed), the formula C claims (x → attn → memory, no MLP there)."""
    c = make(*C)
    a = make(*[o.replace("=C", "=A") for o in C])
    missing, unexpected = a.load_state_dict(c.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("blocks.1.mlp", "blocks.3.mlp")) for k in missing)
    with torch.no_grad():
        for i in (1, 3):
            a.blocks[i].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(c(ids).logits, a(ids).logits, rtol=0, atol=0)


def test_layout_c_trains_is_causal_decodes_and_its_memory_can_be_switched_off():
    """Every parameter gets a gradient and three AdamW steps lower the batch's loss; a later token never changes
    an earlier logit; decoding with a cache equals the full forward; with every memory branch off the reading
    layers add nothing after attention (the logits change)."""
    model = make(*C, "memory.memory_top_k=4", "memory.memory_qk_norm=true", "memory.memory_qk_temperature=16")
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0]
    model.eval()
    assert_future_never_changes_the_past(model, ids, 6, 61)
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(decode_in_chunks(model, ids, [5, 1, 6], model.new_cache(2, 12)), full,
                                   rtol=1e-5, atol=1e-5)
        with ablated(model, model.memory_layers):
            off = model(ids).logits
    assert (off - full).abs().max() > 1e-3


@pytest.mark.parametrize("overrides,message", [
    (["model.use_peer=true", "model.peer_layer_placement=all", "model.peer_config.product_key_dim=[4, 4]",
      "model.peer_config.num_experts=16"], r"C replaces the MLP of layers \[1, 3\], where model.use_peer puts PEER"),
    (["model.base_model_name=some/base"], r"C replaces a block's MLP; adapter runs"),
])
def test_layout_c_refuses_what_has_no_mlp_to_replace(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*C, *overrides)


def test_layout_c_beside_peer_on_other_layers_is_accepted():
    cfg = tiny_config(*C, "model.use_peer=true", "model.peer_layer_placement=custom", "model.peer_layer_indices=[0]",
                      "model.peer_config.product_key_dim=[4, 4]", "model.peer_config.num_experts=16")
    assert cfg.memory.memory_block_variant == "C"
