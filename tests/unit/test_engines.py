"""dpnb.generation.engines: one interface over the fast sampler and HF generate (vLLM:
tests/stages/test_generate.py), the engine registry and the one settings object."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, OPTConfig, OPTForCausalLM

from dpnb.config import GenerateConfig
from dpnb.errors import DpnbError
from dpnb.generation import vllm_engine
from dpnb.generation.engines import ENGINES, engine_name, generation_config, open_engine, strip_prompt_and_cut
from dpnb.generation.next_token import SamplingSettings
from dpnb.models import tiny_causal_lm


@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama", seed=0).eval()


@pytest.fixture(scope="module")
def opt():
    """A causal LM the fast sampler does not know (OPT): "auto" samples it with HF generate."""
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1, eos_token_id=2)
    return OPTForCausalLM(config).eval()


def prompts_of_lengths(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=generator).tolist() for n in lengths]


def generate_one_by_one(model, prompts, settings):
    config = generation_config(settings, pad_id=0)
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[0]
        out.append(strip_prompt_and_cut(row.tolist(), len(prompt), settings.stop_ids))
    return out


def test_auto_takes_the_fast_sampler_where_it_can_else_hf_and_named_engines_are_checked(llama, opt, monkeypatch):
    assert list(ENGINES) == ["vllm", "fast", "hf"]  # the order "auto" tries them in
    assert engine_name("auto", llama) == "fast"
    assert engine_name("auto", opt) == "hf"
    assert engine_name("hf", llama) == "hf"
    with pytest.raises(DpnbError, match="fast sampling supports"):
        engine_name("fast", opt)
    with pytest.raises(DpnbError, match="unknown sampling engine 'beam'"):
        engine_name("beam", llama)
    monkeypatch.setattr(vllm_engine, "is_available", lambda: False)
    with pytest.raises(DpnbError, match=r"pip install dpnb\[vllm\]"):
        engine_name("vllm", llama)


@pytest.mark.parametrize("name", ["fast", "hf"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engines_give_each_distinct_prompt_generates_greedy_continuation(arch, name):
    """HF generate left-pads prompts of different lengths in one call; each row is still the prompt's own."""
    model = tiny_causal_lm(arch, seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator))
    prompts = prompts_of_lengths([3, 7, 7, 12, 3, 5])
    prompts.append(prompts[1])
    settings = SamplingSettings(max_new_tokens=5, do_sample=False, batch_size=3)
    expected = generate_one_by_one(model, prompts, settings)
    assert len({tuple(ids) for ids, _ in expected}) >= 5, "the prompts should continue differently"
    with open_engine(name, model, settings) as engine:
        assert engine.name == name
        assert engine.sample(prompts, seed=0) == expected


def test_hf_engine_samples_a_model_the_fast_sampler_does_not_know(opt):
    prompts = prompts_of_lengths([4, 9, 4])
    greedy = SamplingSettings(max_new_tokens=6, stop_ids=(2,), do_sample=False, batch_size=2)
    with open_engine("auto", opt, greedy) as engine:
        assert engine.name == "hf"
        assert engine.sample(prompts, seed=0) == generate_one_by_one(opt, prompts, greedy)


def test_hf_engine_samples_a_repeated_prompt_as_one_generate_call_per_batch(llama):
    """A generate stage's shard (one label's prompt n times) gives the samples it gave before the engine
    interface: torch seeded once, then one `generate` call per batch_size rows."""
    prompt = prompts_of_lengths([6])[0]
    settings = SamplingSettings(max_new_tokens=5, stop_ids=(7, 9), top_p=0.9, batch_size=2)
    with open_engine("hf", llama, settings) as engine:
        got = engine.sample([prompt] * 5, seed=11)
        assert engine.sample([prompt] * 5, seed=11) == got
    config = generation_config(settings, pad_id=0)
    before = []
    with torch.random.fork_rng():
        torch.manual_seed(11)
        for rows in (2, 2, 1):
            ids = torch.tensor([prompt] * rows)
            out = llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            before += [strip_prompt_and_cut(row, len(prompt), settings.stop_ids) for row in out.tolist()]
    assert got == before


def test_fast_engine_repeats_with_a_seed_across_calls(llama):
    prompts = prompts_of_lengths([3, 8, 20, 8])
    settings = SamplingSettings(max_new_tokens=6, top_p=0.95, top_k=50, batch_size=3)
    with open_engine("fast", llama, settings) as engine:
        first, other, again = engine.sample(prompts, 1), engine.sample(prompts, 2), engine.sample(prompts, 1)
    assert first == again and first != other
    assert [len(ids) for ids, _ in first] == [6] * 4


def test_settings_are_built_once_from_the_config_and_recorded_as_before():
    cfg = GenerateConfig(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=64, min_new_tokens=4, batch_size=16)
    settings = SamplingSettings.from_config(cfg, [5, 2, 5])
    assert settings == SamplingSettings(max_new_tokens=64, stop_ids=(2, 5), temperature=0.8, top_p=0.9, top_k=40,
                                        min_new_tokens=4, batch_size=16)
    # the keys plans recorded before this object existed: their shards still resume
    assert settings.record() == {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "max_new_tokens": 64,
                                 "min_new_tokens": 4, "batch_size": 16}
    assert SamplingSettings(max_new_tokens=3, do_sample=False).record()["do_sample"] is False
    config = generation_config(settings, pad_id=0)
    assert isinstance(config, GenerationConfig) and config.do_sample and config.repetition_penalty == 1.0
    assert (config.temperature, config.top_p, config.top_k, config.eos_token_id) == (0.8, 0.9, 40, [2, 5])
    assert vllm_engine.sampling_params(settings, 3, 7)["stop_token_ids"] == [2, 5]
    with pytest.raises(DpnbError, match="batch_size"):
        SamplingSettings(max_new_tokens=3, batch_size=0)
