"""The paper's GPT-2 path on the CPU: GPT-2's real tokenizer (50,257 tokens, no pad, no BOS, 1,024
positions) through prepare, DP fine-tuning and generation, on a tiny random GPT-2 of that shape
(`tiny-gpt2-bpe`), and an untied GPT-2 saved and reloaded.

The tokenizer is built offline by `make setup` from the BPE ranks inside the openai-whisper sdist
(`dpnb.gpt2_tokenizer`); without it these tests fail with the command to run.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from testkit import write_csv

from dpnb import gpt2_tokenizer
from dpnb.config import FinetuneConfig, GenerateConfig, PrepareConfig
from dpnb.data.prepared import load_prepared
from dpnb.data.prompts import PromptFormat
from dpnb.errors import DpnbError
from dpnb.generation.decoding import sample_continuations
from dpnb.generation.next_token import SamplingSettings
from dpnb.generation.sampling import load_synthetic, sample_labelled
from dpnb.io import read_json
from dpnb.models import load_base_model, load_tokenizer, load_trained, save_trained
from dpnb.rundir import RunDir
from dpnb.stages import finetune, generate, prepare
from dpnb.training import loop
from dpnb.training.loss import Records, collate, per_record_loss
from dpnb.training.trainable import build_model, embeddings_tied, model_card, untie_embeddings

MODEL = "tiny-gpt2-bpe"
EOT = gpt2_tokenizer.END_OF_TEXT_ID  # <|endoftext|>: GPT-2's EOS, BOS and UNK
LABELS = ("negative", "positive")
REVIEWS = [
    "A wonderful film. Great acting and a moving story.",
    "I hated every minute<br /><br />dull and stupid, a waste of 2 hours.",
    "Café owners won't like it: \"meh\" at best... 3/10",
    "Someone typed <|endoftext|> in the middle of this review, which is only text.",
]


@pytest.fixture(scope="module")
def raw_tokenizer():
    """GPT-2's tokenizer exactly as saved: no pad token."""
    return gpt2_tokenizer.load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    """What dpnb trains and samples with: the same tokenizer, padded with EOS."""
    return load_tokenizer(MODEL)


def toy_rows(n: int, long_every: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        text = REVIEWS[i % len(REVIEWS)]
        if long_every and i % long_every == 0:
            text = " ".join([text] * 10)  # about 150 tokens
        rows.append({"id": i, "label": i % 2, "text": text})
    return rows


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_source")
    write_csv(root / "train.csv", toy_rows(48, long_every=5))
    write_csv(root / "test.csv", toy_rows(12))
    return root


# --------------------------------------------------------------------------- the tokenizer itself


def test_the_tokenizer_is_gpt2s(raw_tokenizer):
    tok = raw_tokenizer
    assert len(tok) == gpt2_tokenizer.VOCAB_SIZE == 50257
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == EOT == 50256
    assert tok.pad_token is None and tok.model_max_length == 1024
    assert tok("Hello world")["input_ids"] == [15496, 995]  # GPT-2's published ids
    assert tok(" Hello world")["input_ids"] == [18435, 995]
    assert tok.all_special_ids == [EOT]


def test_the_tokenizer_agrees_with_tiktoken_on_the_same_ranks(raw_tokenizer):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = gpt2_tokenizer.read_ranks(gpt2_tokenizer.tokenizer_dir() / gpt2_tokenizer.RANKS_FILE)
    reference = tiktoken.Encoding("gpt2-ranks", pat_str=gpt2_tokenizer.PATTERN, mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": EOT})
    texts = [*REVIEWS, "  leading spaces,\ttabs\n\nand 1234567 digits; ÉTÉ 😀 naïve  ", "it's we'll they've I'd"]
    for text in texts:
        ours = raw_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours == reference.encode_ordinary(text), text
        assert raw_tokenizer.decode(ours) == text


def test_a_missing_tokenizer_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DPNB_GPT2_TOKENIZER", str(tmp_path / "nowhere"))
    with pytest.raises(DpnbError, match="make setup"):
        load_tokenizer(MODEL)


def test_a_failed_fetch_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, at once and offline
    with pytest.raises(DpnbError, match=r"could not download the openai-whisper.*make setup"):
        gpt2_tokenizer.fetch_gpt2_tokenizer(tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer").exists()


def test_the_build_from_local_ranks_gives_the_same_tokenizer(tmp_path, raw_tokenizer):
    ranks = gpt2_tokenizer.tokenizer_dir() / gpt2_tokenizer.RANKS_FILE
    built = gpt2_tokenizer.load_gpt2_tokenizer(gpt2_tokenizer.fetch_gpt2_tokenizer(tmp_path / "tok", ranks=ranks))
    assert built.get_vocab() == raw_tokenizer.get_vocab()
    assert built(REVIEWS[2])["input_ids"] == raw_tokenizer(REVIEWS[2])["input_ids"]
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(ranks.read_bytes()[:-20])
    with pytest.raises(DpnbError, match="is not GPT-2's BPE ranks"):
        gpt2_tokenizer.fetch_gpt2_tokenizer(tmp_path / "tok", ranks=bad, force=True)


# --------------------------------------------------------------------------- prompt and record


def test_dpnb_pads_with_eos_and_adds_no_bos(tokenizer):
    assert tokenizer.pad_token_id == EOT  # GPT-2 has no pad token: EOS stands in
    fmt = PromptFormat()
    prompt = fmt.prompt_ids("positive", tokenizer)
    assert prompt == tokenizer("positive | ", add_special_tokens=False)["input_ids"] == [24561, 930, 220]
    assert EOT not in prompt  # no BOS in front: GPT-2's tokenizer adds none


def test_the_join_keeps_label_delimiter_and_eos_when_cut(tokenizer):
    fmt = PromptFormat()
    review = " ".join(["A wonderful film."] * 50)
    ids, truncated = fmt.encode("positive", review, tokenizer, max_length=16)
    prompt = fmt.prompt_ids("positive", tokenizer)
    assert truncated and len(ids) == 16
    assert ids[: len(prompt)] == prompt and ids[-1] == EOT and EOT not in ids[:-1]
    assert tokenizer.decode(ids[: len(prompt)]) == "positive | "
    assert tokenizer.decode(ids).startswith("positive | A wonderful film. A wonderful")
    # a literal "<|endoftext|>" in a review is text, never the special token
    ids, _ = fmt.encode("negative", REVIEWS[3], tokenizer, max_length=64)
    assert ids.count(EOT) == 1 and ids[-1] == EOT
    assert tokenizer.decode(ids[:-1], skip_special_tokens=True) == "negative | " + REVIEWS[3]


def test_padding_never_enters_the_loss(tokenizer):
    """The pad id is EOS: a record's loss is the same alone and padded next to a longer one, and its
    closing EOS is a target while the padding after it (the same id) is not."""
    fmt = PromptFormat()
    short, _ = fmt.encode("negative", REVIEWS[0], tokenizer, max_length=64)
    long, _ = fmt.encode("positive", REVIEWS[2] + " " + REVIEWS[1], tokenizer, max_length=64)
    records = Records([short, long], [3, 3])
    batch = collate(records, [0, 1], tokenizer.pad_token_id)
    assert batch.input_ids[0, len(short):].eq(EOT).all()  # padded with the EOS id
    assert int(batch.target_mask[0].sum()) == len(short) - 3  # review tokens and the closing EOS
    assert batch.target_mask[0, len(short) - 1:].eq(0).all()
    model = load_base_model(MODEL)
    with torch.no_grad():
        together = per_record_loss(model(**batch.model_inputs()).logits[:, :-1], batch.targets, batch.target_mask)
        alone = collate(records, [0], tokenizer.pad_token_id)
        single = per_record_loss(model(**alone.model_inputs()).logits[:, :-1], alone.targets, alone.target_mask)
    assert torch.allclose(together[0], single[0], atol=1e-5)


# --------------------------------------------------------------------------- the stages


def gpt2_config(**overrides) -> FinetuneConfig:
    values = dict(mode="full", lr=1e-3, epochs=1, max_steps=2, logical_batch_size=16, physical_batch_size=8,
                  max_grad_norm=1.0, target_epsilon=8, accountant="rdp", checkpoint_every=1000, device="cpu",
                  samples_before_after=1)
    values.update(overrides)
    return FinetuneConfig(**values)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, source):
    """prepare (max_length 1,024: GPT-2's positions), two DP steps, generation: the paper's path, tiny."""
    run = RunDir(tmp_path_factory.mktemp("gpt2_run") / "run")
    prepare.run_stage(run, PrepareConfig(source=str(source), model=MODEL, max_length=1024, n_test=12))
    finetune.run_stage(run, gpt2_config())
    gen_cfg = GenerateConfig(n_per_label=4, max_new_tokens=12, batch_size=4, shard_size=4, min_words=0,
                             device="cpu", zero_shot=False, seed=3)
    generate.run_stage(run, gen_cfg)
    return run


def test_prepared_records_on_gpt2(gpt2_run, tokenizer):
    train, _, manifest = load_prepared(gpt2_run)
    assert manifest["model"] == MODEL and manifest["max_length"] == 1024
    fmt = PromptFormat.from_dict(manifest["prompt"])
    for record in train:
        ids = record["input_ids"]
        prompt = fmt.prompt_ids(record["label_name"], tokenizer)
        assert ids[: record["prompt_length"]] == prompt and record["prompt_length"] == 3
        assert ids[-1] == EOT and EOT not in ids[:-1] and len(ids) <= 1024
    assert max(train["n_tokens"]) > 100  # the long reviews are kept whole: 1,024 tokens leave room


def test_dp_finetuning_then_generation_on_gpt2(gpt2_run, tokenizer):
    record = read_json(gpt2_run.privacy)
    assert record["dp"] is True and record["steps"] == 2 and 0 < record["epsilon"] <= 8
    model, saved_tokenizer = load_trained(gpt2_run.model)
    assert model.config.vocab_size == 50257 and model.config.n_positions == 1024
    assert len(saved_tokenizer) == 50257 and saved_tokenizer.pad_token_id == EOT

    synthetic = load_synthetic(gpt2_run.synthetic)
    assert sorted(synthetic["label_name"]) == sorted(LABELS * 4)
    for text in synthetic["text"]:
        assert "<|endoftext|>" not in text
    summary = read_json(gpt2_run.synthetic / "generation.json")
    assert summary["stop_tokens"] == ["<|endoftext|>"]
    assert summary["prompts"] == {"negative": "negative | ", "positive": "positive | "}
    for line in (gpt2_run.synthetic / "shards" / "shard-00000.jsonl").read_text().splitlines():
        assert EOT not in json.loads(line)["ids"]


def favour_eos(model) -> None:
    """Make `model` (untied) put almost all its mass on EOS at every position, then on one other token."""
    with torch.no_grad():
        direction = torch.randn(model.config.n_embd)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)  # every position's final state is `direction`
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOT] = direction * 50
        model.lm_head.weight[464] = direction * 25  # " The"... the second choice


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_generation_stops_at_endoftext(engine, tokenizer, tmp_path):
    model = load_base_model(MODEL)
    untie_embeddings(model)
    favour_eos(model)  # with min_new_tokens 3: three tokens, then EOS
    cfg = GenerateConfig(n_per_label=2, max_new_tokens=10, min_new_tokens=3, batch_size=2, shard_size=2,
                         min_words=0, max_repeat_fraction=1.0, top_k=2, device="cpu", engine=engine)
    summary = sample_labelled(model, tokenizer, PromptFormat(), LABELS, cfg, tmp_path / "set", progress=False)
    assert summary["hit_max_new_tokens"] == 0 and summary["kept_total"] == 4  # every sample ended at EOS
    rows = [json.loads(line) for line in (tmp_path / "set" / "shards" / "shard-00000.jsonl")
            .read_text().splitlines()]
    assert all(row["stopped"] and len(row["ids"]) == 3 and EOT not in row["ids"] for row in rows)
    for text in load_synthetic(tmp_path / "set")["text"]:
        assert "<|endoftext|>" not in text and text

    # "The The The" is repetitive by default: a set whose samples are all dropped still loads (empty)
    strict = dataclasses.replace(cfg, max_repeat_fraction=0.5)
    dropped = sample_labelled(model, tokenizer, PromptFormat(), LABELS, strict, tmp_path / "empty", progress=False)
    assert dropped["kept_total"] == 0 and dropped["dropped"]["repetitive"] == 4
    assert load_synthetic(tmp_path / "empty").num_rows == 0


# --------------------------------------------------------------------------- positions


def test_max_length_beyond_gpt2s_positions_is_refused_by_prepare(source, tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(DpnbError, match=r"max_length = 1100.*1024.*lower prepare.max_length"):
        prepare.run_stage(run, PrepareConfig(source=str(source), model=MODEL, max_length=1100))


def test_records_longer_than_the_models_positions_are_refused_before_training(source, tmp_path, tokenizer):
    """Records prepared for a longer context (here 1,024 tokens) on a model of 64 positions."""
    run = RunDir(tmp_path / "run")
    prepare.run_stage(run, PrepareConfig(source=str(source), model=MODEL, max_length=1024))
    train, _, _ = load_prepared(run)
    base = load_base_model(MODEL, for_training=True)
    small = type(base)(type(base.config)(**{**base.config.to_dict(), "n_positions": 64}))
    with pytest.raises(DpnbError, match=r"longest training record.*64 positions"):
        loop.train(MODEL, train, gpt2_config(), tmp_path / "out", tokenizer=tokenizer, base_model=small,
                       verbose=False)


# --------------------------------------------------------------------------- an untied GPT-2


def test_an_untied_gpt2_saves_and_reloads_untied(tokenizer, tmp_path):
    """Ghost clipping unties lm_head from wte; the saved model must come back with both, unchanged."""
    cfg = gpt2_config(grad_sample_mode="ghost")
    model, notes = build_model(MODEL, cfg, "cpu")
    assert not embeddings_tied(model) and any("untied" in note for note in notes)
    with torch.no_grad():  # training moves the two apart
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    model.eval()
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    prompt = PromptFormat().prompt_ids("positive", tokenizer)
    greedy = SamplingSettings(max_new_tokens=8, stop_ids=(EOT,), do_sample=False)
    before = sample_continuations(model, prompt, 2, greedy)
    with torch.no_grad():
        hf_before = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=8, pad_token_id=EOT)

    save_trained(model, tokenizer, tmp_path / "model", model_card(MODEL, cfg, notes))
    assert read_json(tmp_path / "model" / "dpnb_model.json")["untied_embeddings"] is True
    reloaded, _ = load_trained(tmp_path / "model")

    assert not embeddings_tied(reloaded) and reloaded.config.tie_word_embeddings is False
    assert torch.equal(reloaded.lm_head.weight, saved["lm_head.weight"])
    assert torch.equal(reloaded.transformer.wte.weight, saved["transformer.wte.weight"])
    assert not torch.equal(reloaded.lm_head.weight, reloaded.transformer.wte.weight)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    after = sample_continuations(reloaded, prompt, 2, greedy)
    assert after == before
    with torch.no_grad():
        hf_after = reloaded.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=8, pad_token_id=EOT)
    assert torch.equal(hf_after, hf_before)


def test_ghost_clipping_trains_an_untied_gpt2_that_reloads_untied(gpt2_run, tokenizer, tmp_path):
    train, _, _ = load_prepared(gpt2_run)
    record = loop.train(MODEL, train, gpt2_config(grad_sample_mode="ghost", samples_before_after=0),
                            tmp_path / "ghost", tokenizer=tokenizer, verbose=False)
    assert record["steps"] == 2
    assert read_json(tmp_path / "ghost" / "model" / "dpnb_model.json")["untied_embeddings"] is True
    model, _ = load_trained(tmp_path / "ghost" / "model")
    base = load_base_model(MODEL)
    assert not embeddings_tied(model)
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # both trained, apart
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
