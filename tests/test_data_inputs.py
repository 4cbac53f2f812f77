"""Tokenizer round trip and id checks; every bad input gives one clear message (or a counted skip)."""
import gzip

import pytest
from transformers import AutoTokenizer

from megamem.config import ConfigError
from megamem.data import build_loader, load_tokenizer

from data_utils import data_config, tokenizer, tokenizer_dir, write_jsonl


def test_trained_tokenizer_round_trips_and_matches_model_ids():
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    for text in ["In the beginning  was light.\nAnd water\n\n", "naïve café — 日本語 ünïcödé 12345\ttab", "x"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, 400)
    ids = tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<|im_start|>", "<|im_end|>"]  # one token each


def test_load_tokenizer_checks_vocab_and_special_ids(tmp_path):
    assert len(load_tokenizer(data_config(tmp_path))) == 400
    with pytest.raises(ConfigError, match="has 400 tokens but model.vocab_size is 300"):
        load_tokenizer(data_config(tmp_path, "model.vocab_size=300"))
    with pytest.raises(ConfigError, match="eos_token_id = 2 but model.eos_token_id is 5"):
        load_tokenizer(data_config(tmp_path, "model.eos_token_id=5"))
    with pytest.raises(ConfigError, match="tokenizer folder not found: /no/such/tok"):
        load_tokenizer(data_config(tmp_path, "model.tokenizer_name=/no/such/tok"))


def _load(tmp_path, path, *extra, split="train"):
    cfg = data_config(tmp_path, f"data.datasets=[{{path: '{path}', eval_path: '{path}'}}]", "data.num_workers=0", *extra)
    loader = build_loader(cfg, tokenizer(), split)
    return loader, next(iter(loader))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match=f"file not found: {tmp_path}/nope.jsonl"):
        _load(tmp_path, tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=f"file is empty: {tmp_path}/empty.jsonl"):
        _load(tmp_path, tmp_path / "empty.jsonl")


def test_record_without_text_field_names_file_and_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "light"}, {"text": "water"}, {"body": "earth"}])
    with pytest.raises(ConfigError, match=r"d.jsonl record 3 has no field 'text' \(text_field; fields: .*body"):
        _load(tmp_path, path, "data.shuffle=false")
    loader, batch = _load(tmp_path, path, "data.bad_records=skip", split="eval")
    assert loader.skipped == {"missing_field": 1}  # counted, and logged once


@pytest.mark.parametrize("streaming", [False, True])
def test_corrupt_json_line_names_file_and_line(tmp_path, capfd, streaming):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "light"}\n{"text": "water"}\n{"text": earth\n{"text": "fire"}\n')
    cfg = data_config(tmp_path, f"data.datasets=[{{path: {path}, eval_path: {path}, streaming: {str(streaming).lower()}}}]")
    with pytest.raises(ConfigError, match=r"d.jsonl line 3: not valid JSON \(Expecting value at column 10\); fix or "
                                          r"remove that record"):
        next(build_loader(cfg, tokenizer()))
    assert "Failed to load JSON" not in capfd.readouterr().err  # datasets' own error log is silenced: one line


def test_undecodable_bytes_name_the_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff\xfe line\n")
    with pytest.raises(ConfigError, match=r"bad.txt: not valid UTF-8 \(invalid start byte"):
        _load(tmp_path, path)


def test_chat_without_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ConfigError, match=r"c.jsonl record 1: chat has no assistant turn \(roles: user\)"):
        _load(tmp_path, path, "training.training_mode=instruction_finetuning", "training.text_field=messages")


def test_unknown_dataset_name(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time: patch the constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = data_config(tmp_path, "training.dataset_name=no-such-org/no-such-dataset")
    with pytest.raises(ConfigError, match="unknown dataset 'no-such-org/no-such-dataset'"):
        build_loader(cfg, tokenizer())


def test_compressed_txt_paragraphs_and_templates(tmp_path):
    path = tmp_path / "d.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("first paragraph\nstill first\n\nsecond one\n")
    cfg = data_config(tmp_path, f"data.datasets=[{{path: '{path}', eval_path: '{path}', sample_by: paragraph}}]")
    batch = next(iter(build_loader(cfg, tokenizer(), "eval")))
    ids = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
    eos = [i for i, t in enumerate(ids) if t == 2]
    docs = [tokenizer().decode(ids[a + 1:b]) for a, b in zip([-1] + eos, eos)]
    assert docs == ["first paragraph\nstill first", "second one\n"]
