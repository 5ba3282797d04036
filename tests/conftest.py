import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from icons_hf import testing  # noqa: E402


@pytest.fixture
def tiny_lora_llama():
    """``build(seed=0, vocab_size=64)``: a 2-layer Llama with LoRA (non-zero B, so every adapter weight has a
    gradient), built from a config (:func:`icons_hf.testing.tiny_lora_llama`)."""
    return testing.tiny_lora_llama


@pytest.fixture
def token_rows():
    """``build(n, seed=0, vocab_size=64, min_len=4, max_len=14)``: random token rows of uneven length with a
    supervised suffix (:func:`icons_hf.testing.token_rows`)."""
    return testing.token_rows


@pytest.fixture
def write_store():
    """``write(path, features, *, indices=None, skip=(), shard_size=None, dtype="float32", weights="w0",
    learning_rate=None, checkpoint=None, record_hashes=None)``: a finished gradient store
    (:func:`icons_hf.testing.write_store`)."""
    return testing.write_store


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (opt in with ``pytestmark = pytest.mark.usefixtures(...)``): the
    models are tiny, one thread is fastest and avoids oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
