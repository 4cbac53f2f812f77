import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megamem.config import load_config  # noqa: E402

torch.set_num_threads(1)

pytest_plugins = ["no_silent_skips"]  # under CI=true a skip is a failure


def tiny_config(*overrides: str, **sections):
    """A small valid config; overrides are `section.key=value` strings."""
    base = ["--model.hidden_dim=32", "--model.num_heads=4", "--model.num_kv_heads=2", "--model.num_layers=4",
            "--model.intermediate_dim=48", "--model.vocab_size=61", "--model.max_seq_len=64",
            "--memory.num_memory_tokens=12", "--training.max_length=64"]
    return load_config(None, base + [f"--{o}" for o in overrides])


def decode_in_chunks(model, ids, chunks, cache, after_each=None):
    """Logits of ids fed in chunks of the given sizes through one decoding cache (after_each(cache) after every
    chunk): the cached path a test compares with the full forward."""
    out, at = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(ids[:, at:at + n], cache=cache).logits)
            at += n
            if after_each is not None:
                after_each(cache)
    return torch.cat(out, 1)


def assert_future_never_changes_the_past(model, ids, t, vocab):
    """Changing the tokens from position t on leaves every logit before t bitwise as it was, and changes later ones."""
    changed = ids.clone()
    changed[:, t:] = (changed[:, t:] + 1) % vocab
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t:] - b[:, t:]).abs().max() > 0


@pytest.fixture
def root():
    return ROOT


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: end-to-end runs on a real one-node SLURM cluster (tools/slurm_cluster.sh)")
