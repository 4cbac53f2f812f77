"""Packing (no token lost or repeated, eos placement, document ids), instruction labels, document masking."""
import json

import pytest
import torch

from megamem.data import build_loader
from megamem.data.instruction import Doc
from megamem.data.packing import IGNORE, PAD_DOC, Packer
from megamem.model import build_model

from conftest import tiny_config
from data_utils import data_config, make_docs, split_docs, tokenizer, write_jsonl


class ListStream:
    """A finite document stream with the Mixture interface."""

    def __init__(self, docs):
        self.docs, self.i = docs, 0

    def state(self):
        return {"i": self.i}

    def load_state(self, st):
        self.i = st["i"]

    def next_doc(self):
        if self.i >= len(self.docs):
            raise StopIteration
        self.i += 1
        return self.docs[self.i - 1]


def rows_of(packer):
    rows = []
    while (r := packer.next_row()) is not None:
        rows.append(r)
    return rows


def test_pretraining_packing_keeps_every_token_once_with_document_ids():
    docs = [Doc(list(range(100 + 10 * d, 100 + 10 * d + n)) + [2]) for d, n in enumerate([3, 12, 1, 7, 30, 5])]
    rows = rows_of(Packer(ListStream(docs), max_length=8, pad_id=0, split_docs=True, pack=True))
    flat = [t for ids, _, _ in rows for t in ids]
    total = sum(len(d.ids) for d in docs)
    assert all(len(ids) == 8 for ids, _, _ in rows)
    assert flat[:total] == [t for d in docs for t in d.ids]  # same tokens, same order, once
    assert flat[total:] == [0] * (len(flat) - total)  # only the last row is padded
    for ids, labels, dids in rows:
        for i, (t, lab, d) in enumerate(zip(ids, labels, dids)):
            if d == PAD_DOC:
                assert lab == IGNORE
                continue
            assert lab == t
            if i and dids[i - 1] != PAD_DOC:  # a new document starts exactly after an eos
                assert (d != dids[i - 1]) == (ids[i - 1] == 2)


def test_instruction_packing_never_splits_examples():
    docs = [Doc([5] * n, [True] * n) for n in (3, 4, 2, 6, 1)]
    rows = rows_of(Packer(ListStream(docs), max_length=7, pad_id=0, split_docs=False, pack=True))
    assert [[t for t in ids if t] for ids, _, _ in rows] == [[5] * 7, [5] * 2, [5] * 7]
    assert [sorted(set(d for d in dids if d != PAD_DOC)) for _, _, dids in rows] == [[0, 1], [0], [0, 1]]
    one_each = rows_of(Packer(ListStream(docs), max_length=7, pad_id=0, split_docs=False, pack=False))
    assert [sum(1 for t in ids if t) for ids, _, _ in one_each] == [3, 4, 2, 6, 1]


def test_packer_state_resumes_inside_a_document():
    docs = [Doc(list(range(10 * d, 10 * d + 9))) for d in range(5)]
    a = Packer(ListStream(docs), 4, 0, True, True)
    first = [a.next_row() for _ in range(3)]
    st = json.loads(json.dumps(a.state()))
    b = Packer(ListStream(docs), 4, 0, True, True)
    b.load_state(st)
    assert st["in_doc"] and rows_of(a) == rows_of(b) and first


@pytest.mark.parametrize("masking", [False, True])
def test_loader_pretraining_every_document_exactly_once(tmp_path, masking):
    texts = make_docs(40)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    cfg = data_config(tmp_path, f"training.dataset_name={path}", f"data.document_masking={str(masking).lower()}",
                      f"data.datasets=[{{path: {path}, eval_path: {path}}}]", "training.dataset_name=null")
    tok = tokenizer()
    batches = list(build_loader(cfg, tok, "eval"))
    ref = sorted(tuple(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for t in texts)
    assert sorted(split_docs(batches)) == ref
    assert all(b["input_ids"].shape == (3, 32) and b["input_ids"].dtype == torch.long for b in batches)
    assert ("document_ids" in batches[0]) == masking
    if masking:
        assert batches[0]["document_ids"].dtype == torch.int32


CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is light"},
        {"role": "assistant", "content": "the light of the earth"},
        {"role": "user", "content": "and water"},
        {"role": "assistant", "content": "water is one with heaven"}]


@pytest.mark.parametrize("pack", [True, False])
def test_instruction_labels_exactly_on_assistant_spans(tmp_path, pack):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 2)
    cfg = data_config(tmp_path, "training.training_mode=instruction_finetuning", "training.text_field=messages",
                      "model.max_seq_len=192", "training.max_length=192", f"data.pack_instructions={str(pack).lower()}",
                      f"data.datasets=[{{path: {path}, eval_path: {path}}}]")
    tok = tokenizer()
    batch = next(iter(build_loader(cfg, tok, "eval")))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    n = len(tok(rendered, add_special_tokens=False)["input_ids"])
    trained = [t for t, l in zip(ids[:n], labels[:n]) if l != -100]
    assert all(l in (-100, t) for t, l in zip(ids, labels))
    assert tok.decode(trained) == "".join(m["content"] + "<|im_end|>\n" for m in CHAT if m["role"] == "assistant")
    untrained = tok.decode([t for t, l in zip(ids[:n], labels[:n]) if l == -100])
    assert "what is light" in untrained and "be brief" in untrained and "light of the" not in untrained
    assert 2 * n <= 192
    second_row_has_example = any(batch["labels"][1].ne(-100).tolist())
    assert second_row_has_example != pack  # packed: both chats fit in row 0


def test_overlong_instruction_examples_truncated_or_skipped_and_counted(tmp_path):
    long_chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ".join(["water"] * 200)}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": long_chat}, {"messages": CHAT}])
    base = [f"data.datasets=[{{path: {path}, eval_path: {path}}}]", "model.max_seq_len=128", "training.max_length=128",
            "training.training_mode=instruction_finetuning", "training.text_field=messages",
            "data.pack_instructions=false"]
    tok = tokenizer()
    loader = build_loader(data_config(tmp_path, *base, "data.overlong=truncate"), tok, "eval")
    b = next(iter(loader))
    assert b["input_ids"][0].ne(0).all() and b["labels"][0].ne(-100).any()  # truncated to exactly 128 tokens
    loader = build_loader(data_config(tmp_path, *base, "data.overlong=skip"), tok, "eval")
    b = next(iter(loader))
    assert tok.decode(b["input_ids"][0]).startswith("<|im_start|>system")  # the long chat was skipped
    assert loader.skipped == {"overlong": 1}


def test_document_masking_equals_documents_run_separately():
    torch.manual_seed(0)
    cfg = tiny_config("memory.memory_layer_placement=every_n", "memory.memory_layer_n=2", "memory.wo_init_zero=false")
    model = build_model(cfg).eval()
    lengths = [5, 9, 3, 7]
    docs = [torch.randint(3, 61, (n,)) for n in lengths]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        out = model(packed, document_ids=doc_ids).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
        unmasked = model(packed).logits[0]
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[5:], alone[5:], atol=1e-3)  # without the mask documents would mix
