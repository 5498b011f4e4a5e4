"""The finetune stage: per-record loss, clipping and noise, accounting, modes, resume, bad parameters.

Tiny random models (tiny-llama, tiny-gpt2) on a toy set of labelled reviews, all on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal

import datasets
import pytest
import torch
from opacus.optimizers.optimizer import DPOptimizer
from safetensors.torch import load_file
from testkit import toy_reviews

from dpnb.config import FinetuneConfig
from dpnb.errors import DpnbError
from dpnb.models import MODEL_CARD, load_causal_lm, load_tokenizer, load_trained, quiet_transformers
from dpnb.privacy import accounting, guarantee
from dpnb.privacy.independent_accounting import cross_check
from dpnb.rundir import CHECKPOINT_FILE
from dpnb.training import dpsgd, loop, train_log
from dpnb.training.checkpoints import TrainingInterrupted
from dpnb.training.loss import Records, collate, initial_loss, per_record_loss
from dpnb.training.plan import TrainingPlan, plan_training
from dpnb.training.trainable import build_model, embeddings_tied, is_quantized_4bit

LABELS = ("negative", "positive")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def toy_dataset(tokenizer, n: int, seed: int = 0) -> datasets.Dataset:
    """`n` records in the prepare stage's layout: "label | review" + EOS, with the prompt's length."""
    ids, prompt_lengths = [], []
    for row in toy_reviews(n, seed=seed):
        prompt = tokenizer(f"{LABELS[row['label']]} | ", add_special_tokens=False)["input_ids"]
        review = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        ids.append(prompt + review + [tokenizer.eos_token_id])
        prompt_lengths.append(len(prompt))
    return datasets.Dataset.from_dict({"input_ids": ids, "prompt_length": prompt_lengths})


@pytest.fixture(scope="module")
def toy(tokenizer) -> datasets.Dataset:
    return toy_dataset(tokenizer, 32)


def config(**overrides) -> FinetuneConfig:
    values = dict(mode="full", dp=True, target_epsilon=50.0, accountant="rdp", max_steps=4, logical_batch_size=8,
                  physical_batch_size=4, max_grad_norm=1.0, lr=3e-3, device="cpu", checkpoint_every=100, seed=0)
    values.update(overrides)
    return FinetuneConfig(**values)


def run(model_name, data, cfg, out, tokenizer, **kwargs):
    return loop.train(model_name, data, cfg, out, tokenizer=tokenizer, verbose=False, **kwargs)


# --------------------------------------------------------------------------- records and the loss


def test_padding_is_masked_by_length_not_by_token_id(tokenizer):
    eos = tokenizer.eos_token_id
    records = Records([[5, 6, 7, eos], [5, 6, 8, 9, 10, eos]], [2, 2])
    batch = collate(records, [0, 1], pad_id=eos)
    assert batch.input_ids.tolist()[0] == [5, 6, 7, eos, eos, eos]
    assert batch.attention_mask.tolist()[0] == [1, 1, 1, 1, 0, 0]
    # targets: tokens 1..T-1; record 0 learns 7 and its EOS (not the prompt's 6, not the two pads)
    assert batch.targets.tolist()[0] == [6, 7, eos, eos, eos]
    assert batch.target_mask.tolist()[0] == [0, 1, 1, 0, 0]
    assert batch.target_mask.tolist()[1] == [0, 1, 1, 1, 1]
    with_prompt = collate(records, [0, 1], pad_id=eos, loss_on_prompt=True)
    assert with_prompt.target_mask.tolist()[0] == [1, 1, 1, 0, 0]
    # one real row per record (not an expanded view): GPT-2's per-record position gradients need it
    assert batch.position_ids.shape == (2, 6) and batch.position_ids.stride(0) == 6
    assert batch.position_ids.tolist()[1] == list(range(6))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_a_records_loss_does_not_depend_on_its_batch(arch, toy, tokenizer):
    model = load_causal_lm(arch).eval()
    records = Records.from_dataset(toy)
    pad = tokenizer.pad_token_id

    def losses(indices):
        batch = collate(records, indices, pad)
        logits = model(**batch.model_inputs()).logits[:, :-1]
        return per_record_loss(logits, batch.targets, batch.target_mask)

    longest = max(range(len(records)), key=lambda i: len(records.input_ids[i]))
    shortest = min(range(len(records)), key=lambda i: len(records.input_ids[i]))
    with torch.no_grad():
        together = losses([shortest, longest])
        alone = torch.cat([losses([shortest]), losses([longest])])
    assert len(records.input_ids[shortest]) < len(records.input_ids[longest])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- clipping and noise


def fixed_noise_plan(cfg: FinetuneConfig, n: int, sigma: float) -> TrainingPlan:
    """The run's plan with a chosen noise multiplier (skips calibrating one: these tests take one step)."""
    plan = plan_training(dataclasses.replace(cfg, dp=False), n)
    return dataclasses.replace(plan, dp=True, noise_multiplier=sigma, delta=accounting.default_delta(n))


def clipped_sum_by_brute_force(model, records, indices, pad_id, clip):
    """sum_i g_i * min(1, C / ||g_i||), one record at a time on a plain copy of the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in indices:
        model.zero_grad()
        batch = collate(records, [i], pad_id)
        logits = model(**batch.model_inputs()).logits[:, :-1]
        per_record_loss(logits, batch.targets, batch.target_mask).sum().backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(float(norm))
        for acc, g in zip(total, grads, strict=True):
            acc += g * min(1.0, clip / (float(norm) + 1e-6))
    return total, norms


def one_dp_step(arch: str, cfg: FinetuneConfig, records: Records, indices: list[int], sigma: float,
                pad_id: int):
    """Build the model and take one DP step on `indices` (one physical batch = the logical batch).

    Returns the model holding the step's gradient, its copy from before the step, the session and the notes.
    """
    torch.manual_seed(0)
    model, notes = build_model(arch, cfg, "cpu")
    reference = copy.deepcopy(model)
    session = dpsgd.make_session(model, cfg, fixed_noise_plan(cfg, len(records), sigma), "cpu")
    with quiet_transformers():
        _, to_backward = dpsgd.forward_losses(session, records, indices, pad_id, False, "cpu")
        to_backward.backward()
        assert session.optimizer.pre_step()  # the end of a logical batch: clip, noise, scale, account
    return model, reference, session, notes


@pytest.mark.parametrize(("arch", "mode", "grad_sample_mode"), [
    ("tiny-llama", "full", "hooks"),
    ("tiny-gpt2", "full", "hooks"),  # per-record gradients of the position table (opacus #841)
    ("tiny-llama", "full", "ghost"),  # ghost clipping on a model with tied embeddings: untied first
    ("tiny-llama", "lora", "hooks"),
])
def test_dp_gradient_is_the_clipped_sum_over_the_expected_batch(arch, mode, grad_sample_mode, toy, tokenizer):
    clip, indices = 1e-2, [0, 3, 5, 6]
    cfg = config(mode=mode, grad_sample_mode=grad_sample_mode, max_grad_norm=clip, lora_r=4)
    records = Records.from_dataset(toy)
    model, reference, session, notes = one_dp_step(arch, cfg, records, indices, 0.0, tokenizer.pad_token_id)
    assert bool(notes) == (grad_sample_mode == "ghost") and not (notes and embeddings_tied(model))

    expected, norms = clipped_sum_by_brute_force(reference, records, indices, tokenizer.pad_token_id, clip)
    assert min(norms) > 2 * clip  # every record is clipped: the comparison is about clipping
    divisor = session.optimizer.expected_batch_size  # int(N q), a constant, not the drawn batch size
    assert divisor == int(len(records) * session.engine.accountant.history[0][1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p, clipped_sum in zip(trainable, expected, strict=True):
        torch.testing.assert_close(p.grad * divisor, clipped_sum, rtol=1e-3, atol=1e-8)
    total = torch.sqrt(sum((p.grad**2).sum() for p in trainable)) * divisor
    assert float(total) <= len(indices) * clip * (1 + 1e-5)  # each record contributes at most C
    assert accounting.accountant_history(session.engine.accountant) == [(0.0, 0.25, 1)]


def test_dp_noise_is_gaussian_with_std_sigma_times_clip(toy, tokenizer):
    clip, sigma, indices = 1e-2, 0.7, [1, 2, 4]
    cfg = config(max_grad_norm=clip)
    records = Records.from_dataset(toy)
    model, reference, session, _ = one_dp_step("tiny-llama", cfg, records, indices, sigma, tokenizer.pad_token_id)
    expected, _ = clipped_sum_by_brute_force(reference, records, indices, tokenizer.pad_token_id, clip)
    noise = torch.cat([(p.grad * session.optimizer.expected_batch_size - clipped_sum).reshape(-1)
                       for p, clipped_sum in zip(model.parameters(), expected, strict=True)])
    # 3.2 million coordinates: the sample std is within a fraction of a percent of sigma * C
    assert abs(float(noise.std()) / (sigma * clip) - 1) < 0.01
    assert abs(float(noise.mean())) < 5 * sigma * clip / math.sqrt(noise.numel())
    assert accounting.accountant_history(session.engine.accountant) == [(sigma, 0.25, 1)]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_without_dp_the_gradient_is_the_plain_mean_over_the_logical_batch(toy, tokenizer):
    cfg = config(dp=False, physical_batch_size=2)
    model, _ = build_model("tiny-llama", cfg, "cpu")
    reference = copy.deepcopy(model)
    records = Records.from_dataset(toy)
    session = dpsgd.make_session(model, cfg, plan_training(cfg, len(records)), "cpu")
    assert session.engine is None
    session.adamw.step = lambda: None  # keep the accumulated gradient for inspection
    session.adamw.zero_grad = lambda set_to_none=True: None
    indices = [0, 1, 2, 7, 9]
    result = next(dpsgd.plain_logical_steps(session, iter([torch.tensor(indices)]), records, cfg,
                                               tokenizer.pad_token_id, "cpu"))
    # physical batches of 2, 2 and 1 give the gradient of one mean over all 5 records: no clipping, no noise
    batch = collate(records, indices, tokenizer.pad_token_id)
    logits = reference(**batch.model_inputs()).logits[:, :-1]
    losses = per_record_loss(logits, batch.targets, batch.target_mask)
    losses.mean().backward()
    assert result.batch_size == 5 and math.isclose(result.loss, float(losses.mean().detach()), rel_tol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-8)


# --------------------------------------------------------------------------- whole runs


def test_training_lowers_the_loss_without_and_with_dp(toy, tokenizer, tmp_path):
    for dp in (False, True):
        cfg = config(dp=dp, max_steps=6, accountant="prv")
        record = run("tiny-llama", toy, cfg, tmp_path / str(dp), tokenizer)
        log = train_log.read_train_log(tmp_path / str(dp))
        assert [r["step"] for r in log] == list(range(7))
        start, end = log[0]["loss"], sum(r["loss"] for r in log[-2:]) / 2
        assert end < start - 0.2, (dp, start, end)
        if not dp:
            assert record["epsilon"] is None and record["noise_multiplier"] is None and record["dp"] is False
            assert all(r["epsilon"] is None for r in log)
            guarantee.verify_privacy(record)  # a non-DP record must not claim an epsilon
            continue
        # the guarantee: at most the target, close to it, for the q, T and delta the run really has
        # (closed forms: q = 1/ceil(32/8), 6 steps, delta = 32^-1.1), as Google's dp_accounting computes it
        assert record["steps"] == 6 == record["planned_steps"]
        assert record["sample_rate"] == 1 / math.ceil(32 / 8) and record["expected_batch_size"] == 8
        assert record["delta"] == pytest.approx(32**-1.1, rel=1e-12)
        assert cfg.target_epsilon - 0.05 <= record["epsilon"] <= cfg.target_epsilon
        assert record["accountant"] == "prv" and set(record["epsilons"]) == {"rdp", "prv"}
        checked = cross_check(record)  # PRV against Google's PLD, epsilons.rdp against Google's RDP
        assert checked["agrees"] and checked["others"]["rdp"]["agrees"]
        assert log[0]["epsilon"] == 0.0 and log[-1]["epsilon"] == pytest.approx(record["epsilon"], rel=1e-9)
        assert all(a["epsilon"] < b["epsilon"] for a, b in zip(log[1:], log[2:], strict=False))
        for key in ("noise_multiplier", "sample_rate", "max_grad_norm", "dataset_size", "logical_batch_size",
                    "physical_batch_size", "epochs", "mode", "grad_sample_mode", "trainable_parameters",
                    "versions", "target_epsilon", "deterministic", "noise_seeded_from", "dp_release", "release_note"):
            assert key in record
        # privacy.json is shareable: no hash or identity of the private records, no seed of the noise
        for key in ("train_sha256", "identity", "secure_rng", "seed"):
            assert key not in record
        assert record["deterministic"] is False and record["dp_release"] is True  # the default: OS entropy
        assert "OS entropy" in record["noise_seeded_from"]
        assert all("batch_size" not in r for r in log)  # how many records a step drew is not published
        assert (tmp_path / "True" / "model" / MODEL_CARD).exists()
        assert not (tmp_path / "True" / "checkpoints" / CHECKPOINT_FILE).exists()


def test_lora_trains_the_adapter_and_leaves_the_base_alone(toy, tokenizer, tmp_path):
    base = load_causal_lm("tiny-llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = config(mode="lora", lora_r=4, lora_targets=("q_proj", "v_proj"), lr=1e-2)
    record = run("tiny-llama", toy, cfg, tmp_path, tokenizer, base_model=base)
    lora = {n: p for n, p in base.named_parameters() if "lora_" in n}
    assert record["trainable_parameters"] == sum(p.numel() for p in lora.values()) > 0
    assert all(float(p.detach().abs().sum()) > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at 0
    for name, value in base.state_dict().items():
        if "lora_" in name:
            continue
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        torch.testing.assert_close(value, before[original], rtol=0, atol=0)
    saved = load_file(tmp_path / "model" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    merged, _ = load_trained(tmp_path / "model")
    fresh = load_causal_lm("tiny-llama").state_dict()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, fresh[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_qlora_trains_adapters_on_a_4bit_base_on_the_cpu(toy, tokenizer, tmp_path):
    directory = tmp_path / "tiny-base"  # a saved model: tiny presets are built in memory, unquantised
    load_causal_lm("tiny-llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    cfg = config(mode="qlora", lora_r=4, max_steps=2)
    record = run(str(directory), toy, cfg, tmp_path / "out", tokenizer)
    assert record["mode"] == "qlora" and record["steps"] == 2 and record["trainable_parameters"] < 10_000
    model, _ = load_trained(tmp_path / "out" / "model")  # CPU: dequantised base, adapter merged
    assert not is_quantized_4bit(model)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    with pytest.raises(DpnbError, match="unquantised"):
        run("tiny-llama", toy, cfg, tmp_path / "tiny", tokenizer)


def test_qlora_dp_gradient_is_the_clipped_sum_of_per_record_gradients(toy, tokenizer, tmp_path):
    """QLoRA on the CPU: Opacus's per-record gradients and their clipped sum over a physical batch of 3
    equal a loop over the records (each alone, plain autograd on the same model, clip to C, sum)."""
    directory = tmp_path / "tiny-base"
    load_causal_lm("tiny-llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    clip, indices, pad = 1e-2, [1, 2, 4], tokenizer.pad_token_id
    cfg = config(mode="qlora", lora_r=4, max_grad_norm=clip)
    records = Records.from_dataset(toy)
    torch.manual_seed(0)
    with quiet_transformers():
        model, _ = build_model(str(directory), cfg, "cpu")
    assert is_quantized_4bit(model)
    # the finetune stage's step-0 loss (eval mode, no grad): on a CPU with AVX512-BF16 bitsandbytes used to
    # repack the 4-bit weights for inference here, after which they passed no gradient back
    initial_loss(model, records, cfg, pad, "cpu")
    model.train()
    with torch.no_grad():  # B starts at zero, which would leave every gradient of A at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    expected, norms = clipped_sum_by_brute_force(model, records, indices, pad, clip)
    model.zero_grad(set_to_none=True)
    assert min(norms) > 2 * clip  # every record is clipped
    session = dpsgd.make_session(model, cfg, fixed_noise_plan(cfg, len(records), 0.0), "cpu")
    with quiet_transformers():
        _, to_backward = dpsgd.forward_losses(session, records, indices, pad, False, "cpu")
        to_backward.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert all(p.grad_sample.shape[0] == len(indices) for p in trainable)
        per_record = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in trainable))
        assert session.optimizer.pre_step()  # one logical batch = this physical batch: clip, (zero) noise, scale
    # fp32 throughout (4-bit weights dequantised to fp32 compute): agreement to 1e-4 relative
    torch.testing.assert_close(per_record, torch.tensor(norms), rtol=1e-4, atol=0)
    divisor = session.optimizer.expected_batch_size
    got = torch.cat([(p.grad * divisor).reshape(-1) for p in trainable])
    want = torch.cat([g.reshape(-1) for g in expected])
    assert float(want.norm()) > 0 and all(float(g.abs().sum()) > 0 for g in expected)
    assert float((got - want).norm() / want.norm()) < 1e-4
    for p, clipped_sum in zip(trainable, expected, strict=True):
        torch.testing.assert_close(p.grad * divisor, clipped_sum, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_empty_poisson_batches_add_noise_and_count_as_steps(tokenizer, tmp_path, monkeypatch):
    noised = []
    original = DPOptimizer.add_noise
    monkeypatch.setattr(DPOptimizer, "add_noise", lambda self: noised.append(1) or original(self))
    data = toy_dataset(tokenizer, 16)
    # deterministic: the seed's Poisson draw has empty logical batches (q = 1/16: each step is empty w.p. 0.36)
    cfg = config(mode="lora", lora_r=2, logical_batch_size=1, physical_batch_size=1, max_steps=6, seed=3,
                 deterministic=True)
    record = run("tiny-llama", data, cfg, tmp_path, tokenizer)
    log = train_log.read_train_log(tmp_path)
    empty = [r for r in log[1:] if r["loss"] is None]  # a step that drew no record logs no loss
    assert empty and len(log) == 7
    # every step, empty or not, added noise (counted here, apart from Opacus's accountant) and is accounted
    assert len(noised) == 6 == record["steps"]
    assert record["sample_rate"] == 1 / 16 and record["delta"] == pytest.approx(16**-1.1, rel=1e-12)
    assert cross_check(record)["agrees"]  # the epsilon of 6 steps at q = 1/16, by Google's dp_accounting
    assert record["dp_release"] is False  # deterministic


def weights(directory):
    name = "model.safetensors" if (directory / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(directory / name)


@pytest.mark.parametrize(("mode", "dp", "stop_at", "how"), [
    ("lora", True, 2, "should_stop"),  # mid-epoch (4 steps per epoch), adapter dropout draws the torch RNG
    ("full", False, 4, "sigint"),  # at an epoch boundary, without DP
])
def test_an_interrupted_run_resumes_to_the_same_result(mode, dp, stop_at, how, toy, tokenizer, tmp_path):
    # deterministic: the whole run and the interrupted one draw the same noise and batches (by default
    # both come from OS entropy, and resuming restores them from the checkpoint)
    cfg = config(mode=mode, dp=dp, lora_r=4, lora_dropout=0.1, max_steps=6, logical_batch_size=8,
                 physical_batch_size=4, checkpoint_every=100, lr_schedule="linear", deterministic=True)
    whole = run("tiny-llama", toy, cfg, tmp_path / "whole", tokenizer)
    lrs = [r["lr"] for r in train_log.read_train_log(tmp_path / "whole")[1:]]
    assert lrs == pytest.approx([cfg.lr * (1 - k / 6) for k in range(6)])  # linear decay, step k uses 1 - k/6

    def stop(step: int) -> bool:
        if step != stop_at:
            return False
        if how == "sigint":
            os.kill(os.getpid(), signal.SIGINT)  # the handler asks the loop to stop after this step
            return False
        return True

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=f"step {stop_at} of 6"):
        run("tiny-llama", toy, cfg, tmp_path / "parts", tokenizer, should_stop=stop)
    assert signal.getsignal(signal.SIGINT) is handler  # the run's handler is gone again
    assert (tmp_path / "parts" / "checkpoints" / CHECKPOINT_FILE).exists()
    assert not (tmp_path / "parts" / "privacy.json").exists()
    assert len(train_log.read_train_log(tmp_path / "parts")) == stop_at + 1
    resumed = run("tiny-llama", toy, cfg, tmp_path / "parts", tokenizer)

    assert resumed["steps"] == whole["steps"] == 6
    assert resumed["epsilon"] == whole["epsilon"]
    strip = ("wall_s",)
    assert ([{k: v for k, v in r.items() if k not in strip} for r in train_log.read_train_log(tmp_path / "parts")]
            == [{k: v for k, v in r.items() if k not in strip} for r in train_log.read_train_log(tmp_path / "whole")])
    a, b = weights(tmp_path / "whole" / "model"), weights(tmp_path / "parts" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run is returned as it is, not trained again
    assert run("tiny-llama", toy, cfg, tmp_path / "parts", tokenizer) == resumed


def test_a_checkpoint_of_other_settings_is_not_resumed(toy, tokenizer, tmp_path):
    cfg = config(mode="lora", lora_r=2, max_steps=3)
    with pytest.raises(TrainingInterrupted):
        run("tiny-llama", toy, cfg, tmp_path, tokenizer, should_stop=lambda step: step == 1)
    with pytest.raises(DpnbError, match="another training setup"):
        run("tiny-llama", toy, dataclasses.replace(cfg, target_epsilon=20.0), tmp_path, tokenizer)
    # changing only how often to checkpoint is no other setup: the run resumes
    record = run("tiny-llama", toy, dataclasses.replace(cfg, checkpoint_every=7), tmp_path, tokenizer)
    assert record["steps"] == 3


def test_a_plan_made_for_more_records_runs_on_the_records_there_are(toy, tokenizer, tmp_path):
    """The audit's twins: planned for N = 40 (q = 1/5 with B = 8, E = 8, delta 1/40^1.1), trained on the 32
    records there are: the loader draws those 32 at q, the optimizer divides by E, the accountant counts q,
    and privacy.json states that mechanism."""
    cfg = config(max_steps=3)
    plan = plan_training(cfg, 32, 40)
    assert (plan.dataset_size, plan.plan_size, plan.sample_rate, plan.divisor) == (32, 40, 1 / 5, 8)
    assert plan.expected_batch_size == 32 / 5 and plan.delta == accounting.default_delta(40) and plan.steps == 3
    with quiet_transformers():
        model, _ = build_model("tiny-llama", cfg, "cpu")
    session = dpsgd.make_session(model, cfg, plan, "cpu")
    assert session.optimizer.expected_batch_size == 8 and session.loader.batch_sampler.sample_rate == 1 / 5
    session.loader.batch_sampler.steps = 500
    drawn = [i for raw in session.loader for i in dpsgd.batch_indices(raw)]
    assert 0 <= min(drawn) and max(drawn) < 32
    # Binomial(500 x 32, 1/5): mean 3,200, sd 51; six sd either way
    assert abs(len(drawn) - 3200) < 6 * math.sqrt(500 * 32 * 0.2 * 0.8)

    record = run("tiny-llama", toy, cfg, tmp_path, tokenizer, plan_size=40)
    assert (record["dataset_size"], record["planned_dataset_size"], record["sample_rate"], record["divisor"]) == \
        (32, 40, 1 / 5, 8)
    assert (record["delta"], record["noise_multiplier"], record["steps"]) == (plan.delta, plan.noise_multiplier, 3)
    guarantee.verify_privacy(record)
    with pytest.raises(DpnbError, match="plan for at least 32"):
        plan_training(cfg, 32, 31)


# --------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(("values", "message"), [
    ({"logical_batch_size": 64}, "larger than the training set"),
    ({"delta": 1 / 32}, "not below 1/N"),
    ({"delta": 0.05}, "not below 1/N"),
])
def test_data_dependent_parameters_fail_before_any_model_loads(values, message, toy, tmp_path):
    with pytest.raises(DpnbError, match=message):
        loop.train("no-such-model", toy, config(**values), tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_a_batch_count_opacus_would_miscount_fails_before_any_model_loads(tokenizer, tmp_path):
    """93 records in logical batches of 1: 93 batches per epoch, which Opacus would count as 92 (and account
    q = 1/92 while sampling at 1/93); refused in planning, naming the nearest size that works."""
    with pytest.raises(DpnbError, match="makes 93 batches per epoch.*use logical_batch_size 2$"):
        loop.train("no-such-model", toy_dataset(tokenizer, 93), config(logical_batch_size=1, physical_batch_size=1),
                       tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("values", "message"), [
    ({"target_epsilon": 0}, "target_epsilon must be a positive number"),
    ({"target_epsilon": -1}, "target_epsilon must be a positive number"),
    ({"physical_batch_size": 16}, "larger than logical_batch_size"),
    ({"mode": "nodp"}, "finetune.mode"),
    ({"lr_schedule": "cosine"}, "finetune.lr_schedule"),
])
def test_bad_settings_are_refused_when_the_config_is_built(values, message):
    with pytest.raises(DpnbError, match=message):
        config(**values)


def test_lora_adapters_go_where_asked():
    with pytest.raises(DpnbError, match="c_attn"):
        build_model("tiny-gpt2", config(mode="lora"), "cpu")
    with pytest.raises(DpnbError, match="at most 2"):
        build_model("tiny-gpt2", config(mode="lora", lora_targets=("c_attn",), lora_top_layers=3), "cpu")
    model, _ = build_model("tiny-gpt2", config(mode="lora", lora_targets=("c_attn",), lora_top_layers=1),
                                    "cpu")
    adapted = {name.split(".lora_")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"base_model.model.transformer.h.1.attn.c_attn"}  # the top block only


# --------------------------------------------------------------------------- views


def test_one_loss_figure_serves_a_run_and_a_report():
    dp_log = [{"step": 0, "epsilon": 0.0, "loss": 4.0}, {"step": 1, "epsilon": 1.0, "loss": None},
              {"step": 2, "epsilon": 2.0, "loss": 3.5}]
    plain_log = [{"step": 0, "epsilon": None, "loss": 4.0}, {"step": 1, "epsilon": None, "loss": 3.0}]
    figure = train_log.plot_loss_vs_epsilon(dp_log, title="one run")
    (axis,) = figure.axes
    assert axis.get_title() == "one run" and axis.get_xlabel() == "epsilon spent"
    assert list(axis.lines[0].get_xdata()) == [0.0, 2.0]  # the step that drew no record is left out
    axis = train_log.plot_loss_vs_epsilon(plain_log).axes[0]
    assert list(axis.lines[0].get_xdata()) == [0, 1] and "no DP" in axis.get_xlabel()
    report_axis = train_log.plot_loss_vs_epsilon(plain_log).axes[0]
    train_log.plot_loss_vs_epsilon({"eps1": dp_log, "nodp": plain_log, "empty": []}, ax=report_axis)
    labels = [line.get_label() for line in report_axis.lines[1:]]
    # beside DP runs, a run without an epsilon has no place on the axis (curves are labelled "name: ...")
    assert labels and {label.split(":")[0] for label in labels} == {"eps1"}
    assert report_axis.get_legend() is not None
