"""The generate stage: shards that resume exactly, post-processing, the dataset card, run_stage."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from dpnb.config import GenerateConfig
from dpnb.data.prompts import PromptFormat
from dpnb.errors import DpnbError
from dpnb.generation import vllm_engine
from dpnb.generation.dataset_card import Provenance, dataset_card
from dpnb.generation.engines import open_engine, strip_prompt_and_cut
from dpnb.generation.next_token import SamplingSettings
from dpnb.generation.sampling import (
    clean_text,
    degeneracy_reason,
    end_of_turn_id,
    load_synthetic,
    model_fingerprint,
    most_frequent_share,
    plan_shards,
    sample_labelled,
    shard_seed,
    stop_token_ids,
)
from dpnb.io import read_json
from dpnb.models import load_causal_lm, load_tokenizer
from dpnb.privacy import guarantee
from dpnb.privacy.guarantee import round_up
from dpnb.stages import generate

LABELS = ("negative", "positive")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_model():
    return load_causal_lm("tiny-llama", seed=0).eval()


def small_config(**overrides) -> GenerateConfig:
    values = dict(n_per_label=3, max_new_tokens=6, batch_size=2, shard_size=2, min_words=0, device="cpu", seed=7)
    values.update(overrides)
    return GenerateConfig(**values)


def shard_contents(out_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out_dir / "shards").glob("shard-*.jsonl"))}


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_model, tokenizer):
    """One uninterrupted run: the reference the other tests compare against."""
    out = tmp_path_factory.mktemp("uninterrupted") / "synthetic"
    summary = sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, small_config(), out, progress=False)
    return out, summary


# --------------------------------------------------------------------------- pure pieces


def test_strip_prompt_and_cut_at_the_first_stop_token():
    prompt = [11, 12, 13]
    assert strip_prompt_and_cut(prompt + [5, 6, 2, 2, 2], 3, {2}) == ([5, 6], True)
    assert strip_prompt_and_cut(prompt + [5, 6, 7], 3, {2}) == ([5, 6, 7], False)
    assert strip_prompt_and_cut(prompt + [9, 5, 6], 3, {2, 9}) == ([], True)
    # a stop id inside the prompt does not cut: only new tokens count
    assert strip_prompt_and_cut([2, 12, 5, 2], 2, {2}) == ([5], True)


def test_clean_text_drops_special_tokens_and_whitespace(tokenizer):
    ids = tokenizer("  A fine film.\n", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert clean_text([*ids, end], tokenizer) == "A fine film."
    assert clean_text([], tokenizer) == ""


def test_degenerate_samples_are_named_by_reason():
    assert degeneracy_reason("", [], 3, 0.5) == "empty"
    assert degeneracy_reason("Great film", [1, 2], 3, 0.5) == "too_short"
    assert degeneracy_reason("bad bad bad bad", [7, 7, 7, 7], 3, 0.5) == "repetitive"
    assert degeneracy_reason("one two three four", [1, 2, 3, 4], 3, 0.5) is None
    # the share is strict: exactly max_repeat_fraction is kept
    assert most_frequent_share([4, 4, 5, 6]) == 0.5
    assert degeneracy_reason("w x y z", [4, 4, 5, 6], 3, 0.5) is None
    assert degeneracy_reason("w x y z", [4, 4, 4, 6], 3, 0.5) == "repetitive"


def test_shards_cover_each_label_once():
    specs = plan_shards([5, 3], 2)
    assert [(s.label, s.n) for s in specs] == [(0, 2), (0, 2), (0, 1), (1, 2), (1, 1)]
    assert [s.index for s in specs] == list(range(5))
    assert [s.shard_in_label for s in specs] == [0, 1, 2, 0, 1]
    assert specs[3].name == "shard-00003.jsonl"


def test_shard_seeds_are_stable_and_distinct():
    seeds = {shard_seed(0, label, shard) for label in range(3) for shard in range(50)}
    assert len(seeds) == 150
    assert shard_seed(0, 1, 2) == shard_seed(0, 1, 2) != shard_seed(1, 1, 2)
    assert all(0 <= s < 2**63 for s in seeds)


def test_round_up_never_shows_a_smaller_value():
    assert round_up(3.21) == 3.21
    assert round_up(7.93125) == 7.94
    assert round_up(1.2345e-5) == pytest.approx(1.24e-5)
    for value in (0.123456, 8.0001, 2.5e-6):
        assert round_up(value) >= value


def test_chat_prompts_also_stop_at_the_end_of_turn(tokenizer):
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == end_of_turn
    assert end_of_turn in stop_token_ids(tokenizer, chat=True)
    assert tokenizer.eos_token_id in stop_token_ids(tokenizer, chat=False)


# --------------------------------------------------------------------------- sampling and shards


def test_sampling_writes_every_requested_sample(sampled, tokenizer):
    out, summary = sampled
    assert summary["requested"] == summary["generated"] == {"negative": 3, "positive": 3}
    assert summary["shards"] == 4 and len(shard_contents(out)) == 4
    dataset = load_synthetic(out)
    assert dataset.column_names == ["text", "label", "label_name"]
    assert len(dataset) == summary["kept_total"] == sum(summary["kept"].values())
    assert sum(summary["kept"].values()) + sum(summary["dropped"].values()) == 6
    # raw shards and the released texts agree: the text is the decoded, stripped new tokens
    records = [json.loads(line) for text in shard_contents(out).values() for line in text.splitlines()]
    assert all(len(r["ids"]) <= 6 for r in records)
    expected = [clean_text(r["ids"], tokenizer) for r in records]
    assert sorted(dataset["text"]) == sorted(t for t in expected if t)
    assert [json.loads(line)["text"] for line in (out / "samples.jsonl").read_text().splitlines()] == dataset["text"]
    assert (out / "samples.csv").read_text().splitlines()[0] == "text,label,label_name"
    assert summary["new_tokens"] == sum(len(r["ids"]) + r["stopped"] for r in records)
    assert summary["tokens_per_second"] > 0
    # the settings as plans recorded them before the one settings object: their shards still resume
    assert summary["sampling"] == {"engine": "fast", "temperature": 1.0, "top_p": 0.95, "top_k": 0, "max_new_tokens": 6,
                                   "min_new_tokens": 0, "batch_size": 2, "shard_size": 2, "n_per_label": 3, "seed": 7}


def test_interrupted_run_resumes_to_the_same_samples(sampled, tmp_path, tiny_model, tokenizer):
    reference, _ = sampled
    out = tmp_path / "synthetic"

    class Interrupt(Exception):
        pass

    def stop_after_shard_1(index: int) -> None:
        if index == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, small_config(), out, progress=False,
                        on_shard=stop_after_shard_1)
    assert sorted(shard_contents(out)) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert not (out / "generation.json").exists()

    resampled: list[int] = []
    sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, small_config(), out, progress=False,
                    on_shard=resampled.append)
    assert resampled == [2, 3]  # only the shards that were missing
    assert shard_contents(out) == shard_contents(reference)
    assert load_synthetic(out)["text"] == load_synthetic(reference)["text"]


def test_a_sweeps_runs_share_shards_sampled_alike(sampled, tmp_path, tiny_model, tokenizer):
    """With a shared directory (a sweep's zero-shot sets) the first run leaves its shards there and the
    next run with the same plan takes them instead of sampling again; another plan samples its own."""
    reference, _ = sampled
    shared = tmp_path / "shared"
    first: list[int] = []
    sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, small_config(), tmp_path / "a" / "zero_shot",
                    progress=False, on_shard=first.append, shared_dir=shared)
    second: list[int] = []
    sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, small_config(), tmp_path / "b" / "zero_shot",
                    progress=False, on_shard=second.append, shared_dir=shared)
    assert first == [0, 1, 2, 3] and second == []  # the second run sampled nothing
    for run in ("a", "b"):
        out = tmp_path / run / "zero_shot"
        assert shard_contents(out) == shard_contents(reference)
        assert load_synthetic(out)["text"] == load_synthetic(reference)["text"]
        assert read_json(out / "generation.json")["timed_shards"] == 4  # the log lines came along
    other: list[int] = []
    sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, small_config(seed=8), tmp_path / "c" / "zero_shot",
                    progress=False, on_shard=other.append, shared_dir=shared)
    assert other == [0, 1, 2, 3] and len([p for p in shared.iterdir() if not p.name.startswith(".")]) == 2


def test_other_model_discards_old_shards_and_refuses_to_replace_a_finished_set(tmp_path, tiny_model, tokenizer):
    out = tmp_path / "synthetic"
    cfg = small_config(n_per_label=1, shard_size=1, batch_size=1)
    sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, cfg, out, progress=False)
    with pytest.raises(DpnbError, match="overwrite=True"):  # same samples, other post-processing
        sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, small_config(n_per_label=1, shard_size=1,
                        batch_size=1, min_words=2), out, progress=False)
    other = load_causal_lm("tiny-llama", seed=1).eval()
    assert model_fingerprint(other) != model_fingerprint(tiny_model)
    with pytest.raises(DpnbError, match="other settings or another model"):
        sample_labelled(other, tokenizer, PromptFormat(), LABELS, cfg, out, progress=False)
    resampled: list[int] = []
    sample_labelled(other, tokenizer, PromptFormat(), LABELS, cfg, out, progress=False, overwrite=True,
                    on_shard=resampled.append)
    assert resampled == [0, 1]
    assert json.loads((out / "shards" / "plan.json").read_text())["model_fingerprint"] == model_fingerprint(other)


def test_too_long_a_request_for_the_context_is_refused(tmp_path, tiny_model, tokenizer):
    cfg = small_config(max_new_tokens=600)  # tiny-llama has 512 positions
    with pytest.raises(DpnbError, match="max_new_tokens"):
        sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, cfg, tmp_path / "s", progress=False)


# --------------------------------------------------------------------------- the dataset card


def fake_privacy(**overrides) -> dict:
    privacy = {"dp": True, "epsilon": 3.21, "epsilons": {"prv": 3.21, "rdp": 3.5}, "delta": 1e-5,
               "accountant": "prv", "noise_multiplier": 0.87, "steps": 12, "sample_rate": 0.05,
               "max_grad_norm": 0.01, "dataset_size": 400, "mode": "full"}
    privacy.update(overrides)
    return privacy


def test_card_states_the_epsilon_of_privacy_json(sampled):
    _, summary = sampled
    card = dataset_card(summary, Provenance("dp", "tiny-llama", "toy reviews", fake_privacy()))
    assert "ε = 3.21, δ = 1.00e-05" in card
    assert "| noise-adding steps | 12 |" in card and "| noise multiplier | 0.87 |" in card
    assert "No DP guarantee" not in card


def test_card_says_no_guarantee_without_dp_and_epsilon_zero_for_zero_shot(sampled):
    _, summary = sampled
    non_dp = dataset_card(summary, Provenance("non_dp", "tiny-llama", "toy reviews", fake_privacy(dp=False)))
    assert "No DP guarantee" in non_dp and "3.21" not in non_dp
    zero_shot = dataset_card(summary, Provenance("zero_shot", "tiny-llama", "toy reviews"))
    assert "No private data was used" in zero_shot and "(ε = 0)" in zero_shot


def test_a_dp_provenance_without_an_epsilon_is_refused():
    with pytest.raises(DpnbError, match="no finite epsilon"):
        Provenance("dp", "tiny-llama", privacy=fake_privacy(epsilon=None))


# --------------------------------------------------------------------------- run_stage


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, toy_data_dir):
    """A run directory after the real prepare stage (tiny-llama's tokenizer, 40 toy reviews)."""
    from dpnb.config import PrepareConfig
    from dpnb.rundir import RunDir
    from dpnb.stages import prepare

    run = RunDir(tmp_path_factory.mktemp("prepared") / "run")
    prepare.run_stage(run, PrepareConfig(source=str(toy_data_dir), model="tiny-llama", n_train=40, n_test=20,
                                         max_length=32))
    return run


def fake_finetune(prepared, target: Path, privacy: dict):
    """Copy the prepared run and add what stage 02 writes, with a privacy.json the test controls.

    The "fine-tuned" model is tiny-llama with other random weights than its base (seed 1 vs 0),
    saved the way finetune saves a full model.
    """
    import shutil
    import time

    from dpnb.io import write_json_atomic
    from dpnb.rundir import RunDir

    shutil.copytree(prepared.path, target)
    run = RunDir(target)
    tokenizer = load_tokenizer("tiny-llama")
    load_causal_lm("tiny-llama", seed=1).save_pretrained(run.model)
    tokenizer.save_pretrained(run.model)
    write_json_atomic(run.model / "dpnb_model.json",
                      {"base": "tiny-llama", "mode": "full", "dtype": "float32", "base_seed": 0, "dp": privacy["dp"]})
    write_json_atomic(run.privacy, privacy)
    run.mark_complete("finetune", {"fake": privacy["dp"]}, time.time())
    return run


def stage_config(**overrides) -> GenerateConfig:
    return small_config(n_per_label=2, max_new_tokens=4, **overrides)


def test_run_stage_writes_both_sets_with_their_guarantees_and_then_skips(prepared, tmp_path):
    run = fake_finetune(prepared, tmp_path / "run", fake_privacy())
    summary = generate.run_stage(run, stage_config())
    assert run.is_complete("generate")
    for name in ("synthetic", "zero_shot"):
        assert summary[name]["requested"] == {"negative": 2, "positive": 2}
        assert len(load_synthetic(getattr(run, name))) == summary[name]["kept_total"]
        for file in ("samples.jsonl", "samples.csv", "README.md", "generation.json"):
            assert (getattr(run, name) / file).exists()
    assert summary["synthetic"]["guarantee"]["epsilon"] == 3.21
    assert "ε = 3.21, δ = 1.00e-05" in (run.synthetic / "README.md").read_text()
    assert summary["zero_shot"]["guarantee"]["kind"] == "zero_shot"
    assert "No private data was used" in (run.zero_shot / "README.md").read_text()
    # base (seed 0) and "fine-tuned" (seed 1) weights differ, so the two sets were sampled apart
    assert summary["synthetic"]["model_fingerprint"] != summary["zero_shot"]["model_fingerprint"]
    assert run.figure(generate.LENGTHS_FIGURE).stat().st_size > 0  # written by the stage, not the notebook

    marker = run.marker("generate").read_text()
    assert generate.run_stage(run, stage_config()) == summary  # skipped: read back from the files
    assert run.marker("generate").read_text() == marker
    with pytest.raises(DpnbError, match="different config"):
        generate.run_stage(run, stage_config(seed=8))


def test_run_stage_without_dp_says_there_is_no_guarantee(prepared, tmp_path):
    privacy = fake_privacy(dp=False, epsilon=None, epsilons=None, delta=None, noise_multiplier=None)
    run = fake_finetune(prepared, tmp_path / "run", privacy)
    summary = generate.run_stage(run, stage_config(zero_shot=False))
    assert summary["zero_shot"] is None and not run.zero_shot.exists()
    assert summary["synthetic"]["guarantee"]["kind"] == "non_dp"
    assert "No DP guarantee" in (run.synthetic / "README.md").read_text()


def test_run_stage_refuses_samples_of_a_model_trained_again(prepared, tmp_path):
    run = fake_finetune(prepared, tmp_path / "run", fake_privacy())
    generate.run_stage(run, stage_config(zero_shot=False))
    run.mark_complete("finetune", {"fake": "trained again"}, 0.0)
    with pytest.raises(DpnbError, match="force=True"):
        generate.run_stage(run, stage_config(zero_shot=False))


def test_run_stage_needs_finetune(prepared):
    with pytest.raises(DpnbError, match="'finetune' has not completed"):
        generate.run_stage(prepared, stage_config())


# --------------------------------------------------------------------------- Private Evolution in the stage


def test_run_stage_writes_a_private_evolution_set_with_its_guarantee(prepared, tmp_path):
    """PE from the base model: a pool twice the set, one noisy vote, n_per_label kept per label; its card and
    privacy.json state the votes' epsilon (recomputable); the histograms before noise stay in pe_private/."""
    run = fake_finetune(prepared, tmp_path / "run", fake_privacy(deterministic=True))
    summary = generate.run_stage(run, stage_config(pe=True, pe_epsilon=4.0, pe_pool_factor=2))
    pe = summary["pe"]
    data = load_synthetic(run.pe)
    assert pe["kept"] == {"negative": 2, "positive": 2} == {n: list(data["label_name"]).count(n) for n in LABELS}
    pool = list(load_synthetic(run.zero_shot)["text"]) + list(load_synthetic(run.pe_pool)["text"])
    assert set(data["text"]) <= set(pool)  # selected from the pool: one vote, no variations
    record = read_json(run.pe / "privacy.json")
    assert record["dp"] and record["steps"] == 1 and record["sample_rate"] == 1.0 and record["epsilon"] <= 4.0
    guarantee.verify_privacy(record)
    card = (run.pe / "README.md").read_text()
    assert "Private Evolution" in card and "ε = 4.00" in card
    histograms = read_json(run.pe_private / "histograms.json")
    assert len(histograms["histograms"]) == 1 and len(histograms["histograms"][0]) == len(pool)
    assert "histograms" not in json.dumps(pe)  # only noisy counts in the shareable summary
    # the noisy histograms, the mechanism's output, are shared in pe/votes.json and drawn; never those before noise
    votes = generate.pe_votes(run)
    (step,) = votes["iterations"]
    assert len(step["noisy_votes"]) == len(step["labels"]) == len(pool) and votes["nearest"] == 4
    assert votes["noise_multiplier"] == record["noise_multiplier"]
    assert step["noisy_votes"] != [round(v, 4) for v in histograms["histograms"][0]]
    noisy_sums = {label: sum(v for v, y in zip(step["noisy_votes"], step["labels"], strict=True) if y == label)
                  for label in (0, 1)}
    for label, name in enumerate(LABELS):
        assert noisy_sums[label] == pytest.approx(pe["evolution"]["iterations"][0]["per_label"][str(label)]
                                                  ["noisy_votes"], abs=0.01)
        mine = [(v, k) for v, y, k in zip(step["noisy_votes"], step["labels"], step["kept"], strict=True) if y == label]
        kept = [v for v, k in mine if k]
        assert len(kept) == pe["kept"][name] and min(kept) == pytest.approx(step["lowest_kept_votes"][name], abs=1e-3)
        assert max(v for v, k in mine if not k) <= min(kept)  # the kept ones are those of most noisy votes
    assert run.figure(generate.PE_VOTES_FIGURE).stat().st_size > 0
    report = generate.pe_report(pe, record)
    assert f"sigma = {record['noise_multiplier']:.4f}" in report and f"({round_up(record['epsilon'])}, " in report
    assert generate.run_stage(run, stage_config(pe=True, pe_epsilon=4.0, pe_pool_factor=2))["pe"] == pe
    # without DP the votes are exact, a statistic of the records: no votes.json, no figure
    generate.run_stage(run, stage_config(pe=True, pe_epsilon=None, pe_pool_factor=2), force=True)
    assert generate.pe_votes(run) is None and not run.figure(generate.PE_VOTES_FIGURE).exists()


def test_private_evolution_from_the_finetuned_model_composes_both_budgets(prepared, tmp_path):
    """PE from the DP fine-tuned model, relabelled by a DP classifier, with two iterations (variations): the
    set's epsilon is the total of all three mechanisms composed, never the votes' alone."""
    run = fake_finetune(prepared, tmp_path / "run", fake_privacy(deterministic=True))
    cfg = stage_config(pe=True, pe_start="finetuned", pe_epsilon=8.0, pe_relabel_epsilon=1.0, pe_iterations=2,
                       zero_shot=False)
    summary = generate.run_stage(run, cfg)
    record = read_json(run.pe / "privacy.json")
    names = [m["name"] for m in record["mechanisms"]]
    assert names == ["DP-SGD fine-tuning", "DP classifier that labels the pool", "Private Evolution votes"]
    assert 7.9 <= record["epsilon"] <= 8.0 and record["mechanisms"][2]["steps"] == 2
    guarantee.verify_privacy(record)
    assert len(summary["pe"]["evolution"]["iterations"]) == 2
    # at most n_per_label of each label: a label the DP classifier gave few samples keeps fewer
    assert all(n <= 2 for n in summary["pe"]["kept"].values()) and summary["pe"]["kept_total"] == len(
        load_synthetic(run.pe))
    card = (run.pe / "README.md").read_text()
    assert "ALL the mechanisms" in card and "DP-SGD fine-tuning" in card
    votes = generate.pe_votes(run)
    assert [step["iteration"] for step in votes["iterations"]] == [1, 2]
    assert votes["noise_multiplier"] == record["mechanisms"][2]["noise_multiplier"]
    report = generate.pe_report(summary["pe"], record)
    assert "composed: DP-SGD fine-tuning" in report and "iteration 2:" in report


# --------------------------------------------------------------------------- the optional vLLM engine


def test_vllm_settings_and_stop_tokens_in_its_terms():
    settings = SamplingSettings.from_config(small_config(top_k=0, min_new_tokens=2), {2, 0})
    params = vllm_engine.sampling_params(settings, 5, 123)
    assert params == {"n": 5, "temperature": 1.0, "top_p": 0.95, "top_k": -1, "max_tokens": 6, "min_tokens": 2,
                      "seed": 123, "stop_token_ids": [0, 2], "detokenize": False}
    assert vllm_engine.sampling_params(SamplingSettings.from_config(small_config(top_k=40), {2}), 1, 0)["top_k"] == 40
    greedy = SamplingSettings(max_new_tokens=3, do_sample=False)
    assert vllm_engine.sampling_params(greedy, 1, 0)["temperature"] == 0.0
    assert vllm_engine.cut_at_stop([5, 6, 2, 7], "stop", {2}) == ([5, 6], True)  # the stop token returned
    assert vllm_engine.cut_at_stop([5, 6], "stop", {2}) == ([5, 6], True)  # or not
    assert vllm_engine.cut_at_stop([5, 6], "length", {2}) == ([5, 6], False)


def test_vllm_engine_is_refused_with_the_fix_when_not_installed(tmp_path, tiny_model, tokenizer, monkeypatch):
    monkeypatch.setattr(vllm_engine, "is_available", lambda: False)
    with pytest.raises(DpnbError, match=r"pip install dpnb\[vllm\]"):
        sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, small_config(engine="vllm"), tmp_path / "s",
                        progress=False)


def test_vllm_engine_samples_shards_like_the_others(tmp_path, tiny_model, tokenizer, monkeypatch):
    """vLLM itself is not installed here (it needs a GPU): a stand-in with its interface checks dpnb's side.
    One request per shard, seeded as the other engines seed a shard, with the config's settings; the
    weights it loads are the model's, exported beside the set and removed; samples cut at the stop token."""
    requests, loaded = [], []
    stop = tokenizer.eos_token_id

    class Output:
        def __init__(self, token_ids, finish_reason):
            self.token_ids, self.finish_reason = token_ids, finish_reason

    class StandInLLM:
        def __init__(self, model, tokenizer, dtype, seed, max_model_len, gpu_memory_utilization,
                     enable_prefix_caching):
            weights = AutoModelForCausalLM.from_pretrained(model)
            assert model_fingerprint(weights) == model_fingerprint(tiny_model)  # the very weights being sampled
            loaded.append((dtype, max_model_len))

        def generate(self, prompts, params, use_tqdm):
            requests.append((prompts, params))
            words = tokenizer(" a quiet film about trains", add_special_tokens=False)["input_ids"]
            outputs = [Output(words[: 3 + i % 3] + [stop], "stop") for i in range(params["n"] - 1)]
            return [type("Request", (), {"outputs": outputs + [Output(words, "length")]})()]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=StandInLLM, SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(vllm_engine, "is_available", lambda: True)
    cfg = small_config(engine="vllm")
    out = tmp_path / "synthetic"
    summary = sample_labelled(tiny_model, tokenizer, PromptFormat(), LABELS, cfg, out, progress=False)

    assert summary["sampling"]["engine"] == "vllm" and len(loaded) == 1
    assert loaded[0] == ("float32", max(len(PromptFormat().prompt_ids(name, tokenizer)) for name in LABELS) + 6)
    specs = plan_shards([3, 3], 2)
    assert len(requests) == len(specs) == 4
    for spec, (prompts, params) in zip(specs, requests, strict=True):
        assert prompts == [{"prompt_token_ids": list(PromptFormat().prompt_ids(LABELS[spec.label], tokenizer))}]
        assert params["n"] == spec.n and params["seed"] == shard_seed(7, spec.label, spec.shard_in_label)
    rows = [json.loads(line) for line in (out / "shards" / "shard-00000.jsonl").read_text().splitlines()]
    assert [r["stopped"] for r in rows] == [True, False] and stop not in rows[0]["ids"]
    assert summary["kept_total"] == 6 and not list(tmp_path.glob(".*weights*"))  # the export is gone
    assert tiny_model.device.type == "cpu"


def test_vllm_engine_sends_one_request_per_distinct_prompt(tmp_path, tiny_model, tokenizer, monkeypatch):
    """Many distinct prompts (Private Evolution's variations): one request per distinct prompt, for as many
    samples as it appears, each request seeded apart (one seed for all would correlate their draws); the
    samples come back in prompt order."""
    calls = []

    class Output:
        def __init__(self, token_ids, finish_reason):
            self.token_ids, self.finish_reason = token_ids, finish_reason

    class StandInLLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def generate(self, prompts, params, use_tqdm):
            calls.append((prompts, params))
            return [type("Request", (), {"outputs": [Output([p["prompt_token_ids"][-1], i, 2], "stop")
                                                     for i in range(settings["n"])]})()
                    for p, settings in zip(prompts, params, strict=True)]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=StandInLLM, SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(vllm_engine, "is_available", lambda: True)
    prompts = [[5, 6], [7], [5, 6], [9, 9, 9]]
    with open_engine("vllm", tiny_model, SamplingSettings(max_new_tokens=4, stop_ids=(2,)), tokenizer=tokenizer,
                     scratch_dir=tmp_path) as engine:
        samples = engine.sample(prompts, seed=42)
    ((sent, params),) = calls
    assert sent == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}, {"prompt_token_ids": [9, 9, 9]}]
    assert [p["n"] for p in params] == [2, 1, 1]
    assert params[0]["seed"] == 42 and len({p["seed"] for p in params}) == 3
    assert samples == [([6, 0], True), ([7, 0], True), ([6, 1], True), ([9, 0], True)]
    assert tiny_model.device.type == "cpu" and not list(tmp_path.glob(".*weights*"))
