"""Model presets: offline defaults load, Hub models fail clearly offline, tiny models for tests."""

from __future__ import annotations

import pytest

from dpnb import models
from dpnb.errors import DpnbError


def test_presets_cover_the_paper_and_the_offline_defaults():
    for name in ("smollm2-135m", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-2-7b",
                 "minilm-l6", "distilbert-base-uncased", "tiny-llama", "tiny-gpt2"):
        assert name in models.PRESETS
    assert models.PRESETS["llama-2-7b"].default_mode == "qlora"
    assert models.PRESETS["gpt2"].default_mode == "full"


def test_hub_model_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setattr(models, "_HUB_OFFLINE", True)
    with pytest.raises(DpnbError, match="could not be loaded from the Hugging Face Hub.*smollm2-135m"):
        models.load_tokenizer("openai-community/gpt2-does-not-exist")


def test_missing_local_directory_is_named():
    with pytest.raises(DpnbError, match="does not exist"):
        models.resolve("./no/such/model")


def test_wrong_kind_of_model_is_refused():
    with pytest.raises(DpnbError, match="classifier preset"):
        models.load_causal_lm("minilm-l6")
    with pytest.raises(DpnbError, match="generator preset"):
        models.load_classifier("tiny-llama", 2)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_are_offline_and_deterministic(arch):
    import torch

    a, b = models.load_causal_lm(arch, seed=1), models.load_causal_lm(arch, seed=1)
    tokenizer = models.load_tokenizer(arch)
    assert a.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer("a wonderful film")["input_ids"]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert sum(p.numel() for p in a.parameters()) < 5_000_000


def test_packaged_generator_and_classifier_load_offline():
    tokenizer = models.load_tokenizer("smollm2-135m")
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    model, clf_tokenizer = models.load_classifier("minilm-l6", num_labels=2)
    assert model.config.num_labels == 2
    assert clf_tokenizer("a film")["input_ids"][0] == clf_tokenizer.cls_token_id


def test_one_base_loader_gives_the_pretrained_weights_for_training_and_for_sampling():
    import torch

    fresh = models.load_causal_lm("tiny-llama", seed=2)
    for_sampling = models.load_base_model("tiny-llama", mode="lora", seed=2)
    for_training = models.load_base_model("tiny-llama", mode="full", seed=2, for_training=True)
    assert not for_sampling.training
    for model in (for_sampling, for_training):
        state = model.state_dict()
        assert all(torch.equal(value, state[name]) for name, value in fresh.state_dict().items())
