"""dpnb.generation.decoding: the fast sampler gives Hugging Face generate's tokens (greedy) and distribution
(sampling)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from dpnb.errors import DpnbError
from dpnb.generation.decoding import continue_prompts, is_supported, sample_continuations
from dpnb.generation.engines import strip_prompt_and_cut
from dpnb.generation.fast_forward import _packing_available, runner_for
from dpnb.generation.next_token import SamplingSettings, token_probabilities
from dpnb.models import load_tokenizer, tiny_causal_lm

TEXTS = ("A film review:", "A film review: the", "Once upon a time in a land far", "Hi", "A film review:")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def peaked(arch: str, scale: float = 1.0):
    """A tiny random model with an untied random output layer: its greedy tokens vary from step to step
    and are far apart from the runner-up (a random tied head mostly repeats the last token)."""
    model = tiny_causal_lm(arch, seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return peaked(request.param)


def greedy(max_new_tokens, stop_ids=(), **settings):
    return SamplingSettings(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids), do_sample=False, **settings)


def hf_greedy(model, prompts, max_new_tokens, stop_ids, min_new_tokens=0):
    """Hugging Face generate, one prompt at a time, cut as the generate stage cuts it."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              eos_token_id=list(stop_ids) or None, pad_token_id=0)
    rows = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        rows.append(strip_prompt_and_cut(out[0].tolist(), len(prompt), stop_ids))
    return rows


# --------------------------------------------------------------------------- greedy: HF's exact tokens


@pytest.mark.parametrize("prepack", [True, False])
def test_greedy_matches_generate_with_refilled_rows(model, tokenizer, prepack):
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    free_running = hf_greedy(model, prompts, 10, [])
    # stop tokens that end samples at different steps, one of them at the very first token
    stops = {free_running[3][0][0], free_running[0][0][2], free_running[2][0][6]}
    expected = hf_greedy(model, prompts, 10, stops)
    assert len({len(ids) for ids, _ in expected}) >= 3, "the rows should end at different steps"
    assert {stopped for _, stopped in expected} == {True, False}
    # 2 rows for 5 samples: rows are refilled, then packed when nothing is pending
    got = continue_prompts(model, prompts, greedy(10, stops, batch_size=2), prepack=prepack)
    assert got == expected
    assert continue_prompts(model, prompts, greedy(10, stops, batch_size=8), prepack=prepack) == expected


def test_weights_are_packed_where_the_cpu_allows(model):
    if not _packing_available():
        pytest.skip("this torch build has no oneDNN linear ops")
    runner = runner_for(model)
    runner.pack(4)
    assert len(runner.linears) == len(runner.projection_groups())  # every projection of a plain model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_weights_are_packed_and_give_the_models_logits_up_to_bf16_rounding(arch):
    """In bfloat16 every projection is packed too (oneDNN's bf16 products), and the padded prefill of
    prompts of different lengths gives each prompt's next-token logits as close to the float32 model's
    as the model's own bf16 forward is."""
    exact, model = peaked(arch), peaked(arch).to(torch.bfloat16)
    prompts = distinct_prompts(6)
    width = max(map(len, prompts))
    tokens = torch.tensor([p + p[-1:] * (width - len(p)) for p in prompts])
    with torch.inference_mode():
        reference = torch.stack([exact(torch.tensor([p])).logits[0, -1] for p in prompts])
        own_bf16 = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts]).float()
        runner = runner_for(model)
        if _packing_available():
            runner.pack(len(prompts))
            assert len(runner.linears) == len(runner.projection_groups())
        got = runner.logits(tokens, torch.arange(width).expand(len(prompts), width),
                            runner.new_cache(len(prompts), width), torch.tensor([len(p) - 1 for p in prompts]))
    assert got.dtype == torch.bfloat16
    assert (got.float() - reference).abs().max() <= 2 * (own_bf16 - reference).abs().max()


def test_lora_model_matches_generate(tokenizer):
    """A PEFT model: its LoRA layers run as modules (never packed), the rest packed."""
    from peft import LoraConfig, get_peft_model

    base = peaked("llama")
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False)).eval()
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS[:3]]
    expected = hf_greedy(lora, prompts, 6, [0])
    with lora.disable_adapter():
        assert hf_greedy(lora, prompts, 6, [0]) != expected, "the adapter should change the tokens"
    assert continue_prompts(lora, prompts, greedy(6, [0], batch_size=2)) == expected
    runner = runner_for(lora)
    runner.pack(2)
    assert 0 < len(runner.linears) < len(runner.projection_groups())


def test_greedy_min_new_tokens_matches_generate(model, tokenizer):
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    free_running = hf_greedy(model, prompts, 8, [])
    stops = {free_running[3][0][0], free_running[0][0][1], free_running[1][0][4]}
    expected = hf_greedy(model, prompts, 8, stops, min_new_tokens=3)
    assert all(len(ids) >= 3 for ids, _ in expected)
    got = continue_prompts(model, prompts, greedy(8, stops, min_new_tokens=3, batch_size=3))
    assert got == expected


def test_one_prompt_greedy_rows_all_match_generate(model, tokenizer):
    prompt = tokenizer("A film review:")["input_ids"]
    expected = hf_greedy(model, [prompt], 6, [0])[0]
    assert sample_continuations(model, prompt, 3, greedy(6, [0])) == [expected] * 3


# --------------------------------------------------------------------------- many distinct prompts


def distinct_prompts(n, seed=0):
    """Private Evolution's shape: one shared prefix (a chat prompt), then an opening of 3-30 tokens each;
    some prompts appear twice, far apart."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 4000, (12,), generator=generator).tolist()
    prompts = [shared + torch.randint(3, 4000, (int(torch.randint(3, 31, (1,), generator=generator)),),
                                      generator=generator).tolist() for _ in range(n)]
    return prompts + [prompts[3], prompts[0], prompts[n // 2]]


def test_many_distinct_prompts_match_generate_prompt_by_prompt(model, monkeypatch):
    """Each prompt's greedy continuation is generate's for that prompt alone, while the prompts' own
    tokens run through the model in batches as rows free up (each distinct prompt once, at most a
    batch of rows at a time), not one prompt per forward pass."""
    from dpnb.generation import fast_forward

    prompts = distinct_prompts(30)
    expected = hf_greedy(model, prompts, 6, [])
    forwards = []
    logits = fast_forward.Runner.logits

    def counted(self, tokens, positions, cache, last=None):
        forwards.append((tokens.shape, last is not None))
        return logits(self, tokens, positions, cache, last)

    monkeypatch.setattr(fast_forward.Runner, "logits", counted)
    assert continue_prompts(model, prompts, greedy(6, batch_size=8)) == expected
    prefills = [shape for shape, is_prefill in forwards if is_prefill]
    assert sum(rows for rows, _ in prefills) == 30  # every distinct prompt once, the repeated ones too
    assert max(rows for rows, _ in prefills) <= 8  # never more prompts at once than rows
    assert len(prefills) <= 10  # batches: 30 prompts one by one would take 30 passes
    assert max(steps for _, steps in prefills) > 3  # the openings, padded to the longest of a batch


def test_many_distinct_prompts_sample_each_its_own_distribution_and_repeat_with_a_seed(model):
    prompts = distinct_prompts(24, seed=1)
    settings = SamplingSettings(max_new_tokens=4, top_p=0.6, temperature=1.2, batch_size=6)
    first = continue_prompts(model, prompts, settings, generator=torch.Generator().manual_seed(9))
    assert first == continue_prompts(model, prompts, settings, generator=torch.Generator().manual_seed(9))
    assert first != continue_prompts(model, prompts, settings, generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():  # each first token is one the warpers keep for that sample's own prompt
        for prompt, (ids, _) in zip(prompts, first, strict=True):
            kept = hf_probabilities(model(torch.tensor([prompt])).logits[:, -1], temperature=1.2, top_p=0.6)[0]
            assert kept[ids[0]] > 0


# --------------------------------------------------------------------------- sampling: HF's distribution


def hf_probabilities(logits, temperature=1.0, top_k=0, top_p=1.0):
    """softmax after Hugging Face's warpers, in generate's order."""
    scores = logits.clone()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "head_cuts"), [
    (1.0, 0, 0.95, None),  # the demo's settings
    (0.7, 0, 0.9, None),
    (1.3, 0, 0.5, None),
    (1.0, 0, 0.95, (0.5,)),  # a cut no row passes: every row sorted in full
    (1.0, 0, 0.95, (1e-3,)),  # some rows settled by the cut, the others sorted
    (1.3, 50, 0.8, None),
    (1.0, 40, 1.0, None),
    (1.0, 0, 1.0, None),
])
def test_filtered_distribution_equals_hf_warpers(temperature, top_k, top_p, head_cuts):
    generator = torch.Generator().manual_seed(0)
    # rows from flat (thousands of tokens kept) to peaked (one or two)
    logits = torch.randn(24, 49152, generator=generator) * torch.linspace(1.5, 12.0, 24)[:, None]
    settings = SamplingSettings(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    got = token_probabilities(logits, settings, head_cuts)
    expected = hf_probabilities(logits, temperature, top_k, top_p)
    same = ((got > 0) == (expected > 0)).all(dim=-1)
    for row in (~same).nonzero().squeeze(1).tolist():
        assert_rounding_at_the_boundary(logits[row] / temperature, got[row], expected[row], top_p)
    assert same.sum() >= len(same) - 1
    torch.testing.assert_close(got[same], expected[same], atol=1e-6, rtol=1e-4)


def assert_rounding_at_the_boundary(scores, got, expected, top_p):
    """The kept sets may differ only by the last token, when the mass before it is top_p up to float
    rounding: HF sums the float32 probabilities from the smallest, dpnb.generation.decoding in float64 from the
    largest."""
    probs = scores.softmax(dim=-1).double().sort(descending=True).values
    kept = sorted([int((got > 0).sum()), int((expected > 0).sum())])
    assert kept[1] == kept[0] + 1
    assert abs(float(probs[: kept[0]].sum()) - top_p) < 1e-5


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 0.0]])
    got = token_probabilities(logits, SamplingSettings(max_new_tokens=1, top_k=3))
    expected = hf_probabilities(logits, top_k=3)
    assert (got[0] > 0).sum() == 5 and (got[1] > 0).sum() == 3
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("scale", "settings"), [
    (0.3, {"temperature": 1.5, "top_k": 6, "top_p": 0.9}),
    (1.0, {"temperature": 1.5, "top_p": 0.8}),  # top-p alone: the vocabulary head path
])
def test_two_token_frequencies_match_the_model(scale, settings):
    """Chi-square of sampled (first, second) token pairs against the model's warped probabilities:
    exercises the first draw from the prompt, a decoding step, and rows refilled in between."""
    from scipy.stats import chi2

    model = peaked("llama", scale=scale)  # a few tokens of clearly different probabilities
    prompt = [1, 504, 3158, 42]
    n = 1500
    samples = sample_continuations(model, prompt, n, SamplingSettings(max_new_tokens=2, batch_size=64, **settings),
                                   generator=torch.Generator().manual_seed(3))
    assert all(len(ids) == 2 and not stopped for ids, stopped in samples)
    with torch.inference_mode():
        first = hf_probabilities(model(torch.tensor([prompt])).logits[:, -1], **settings)[0]
        firsts = first.nonzero().squeeze(1).tolist()
        batch = torch.tensor([[*prompt, token] for token in firsts])
        second = hf_probabilities(model(batch).logits[:, -1], **settings)
    expected = {(a, b): n * float(first[a] * second[i, b]) for i, a in enumerate(firsts)
                for b in second[i].nonzero().squeeze(1).tolist()}
    counts = {pair: 0 for pair in expected}
    for ids, _ in samples:
        assert tuple(ids) in counts, "a pair the warpers remove was sampled"
        counts[tuple(ids)] += 1
    # cells expected at least 5 times, the rest pooled into one
    big = [pair for pair, e in expected.items() if e >= 5]
    observed = [counts[p] for p in big] + [n - sum(counts[p] for p in big)]
    wanted = [expected[p] for p in big] + [n - sum(expected[p] for p in big)]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, wanted, strict=True) if e > 0)
    assert len(big) >= 10
    assert chi2.sf(statistic, len(big)) > 1e-3, (statistic, len(big))


def test_seeded_generator_repeats_and_lengths_are_respected():
    model = tiny_causal_lm("llama", seed=0).eval()  # a near-uniform model: a third of all tokens stop it
    stops = range(0, 49152, 3)
    settings = SamplingSettings(max_new_tokens=6, min_new_tokens=3, stop_ids=stops, top_k=200, top_p=0.95, batch_size=8)
    first = sample_continuations(model, [1, 2, 3], 40, settings, generator=torch.Generator().manual_seed(5))
    again = sample_continuations(model, [1, 2, 3], 40, settings, generator=torch.Generator().manual_seed(5))
    assert first == again
    stop_set = set(stops)
    for ids, stopped in first:
        assert 3 <= len(ids) <= 6 and not stop_set.intersection(ids)
        assert len(ids) < 6 if stopped else len(ids) == 6
    assert {stopped for _, stopped in first} == {True, False}


# --------------------------------------------------------------------------- what it refuses


def test_supported_models_and_refusals():
    model = tiny_causal_lm("gpt2", seed=0, n_positions=16).eval()
    assert is_supported(model)
    assert not is_supported(types.SimpleNamespace(config=types.SimpleNamespace(model_type="t5")))
    with pytest.raises(DpnbError, match="context"):
        sample_continuations(model, [1] * 10, 2, SamplingSettings(max_new_tokens=7, stop_ids=(0,)))
    with pytest.raises(DpnbError, match="top_p"):
        SamplingSettings(max_new_tokens=2, stop_ids=(0,), top_p=0.0)
    with pytest.raises(DpnbError, match="min_new_tokens"):
        SamplingSettings(max_new_tokens=2, min_new_tokens=3, stop_ids=(0,))
    with pytest.raises(DpnbError, match="vocabulary"):
        sample_continuations(model, [1], 1, SamplingSettings(max_new_tokens=1, stop_ids=(10**6,)))
    with pytest.raises(DpnbError, match="not 't5'"):
        sample_continuations(types.SimpleNamespace(config=types.SimpleNamespace(model_type="t5")), [1], 1,
                             SamplingSettings(max_new_tokens=1, stop_ids=(0,)))
