"""dpnb.training.prefix_cache: training the top blocks from cached states is DP-SGD on the full model.

The key test computes, for one physical batch of cached (padded) records, Opacus's per-sample
gradients (GradSampleModule hooks on `TopBlocks`) of the `head_loss` per-record loss, then the
clipped sum of Opacus's DPOptimizer (noise 0), and compares them with a brute-force loop over the
records, one at a time (no padding), through the FULL uncached model with ordinary logits,
`per_record_loss` and plain autograd, clipping each gradient with Opacus's formula
g * min(1, C / (||g|| + 1e-6)). C is the median of the records' gradient norms, so some are clipped
and some are not. Tolerance (float32): rtol 1e-4, atol 1e-5 x the largest entry (measured: ~7e-7
x the largest entry; feeding the rotary embedding wrong positions gives 1e-2).
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from dpnb.errors import DpnbError
from dpnb.io import DamagedFile
from dpnb.training import frozen_prefix
from dpnb.training.frozen_prefix import shared_prefix_cache
from dpnb.training.head_loss import FrozenHeadLoss
from dpnb.training.loss import Records, collate, per_record_loss
from dpnb.training.prefix_cache import (
    PrefixCache,
    TopBlocks,
    build_prefix_cache,
    check_frozen_prefix,
    collate_cached,
    first_trainable_block,
    model_parts,
)

VOCAB = 61
pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),  # the inputs carry no grad
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # peft calls it
]


def tiny(arch: str, dropout: float = 0.0):
    """A 4-block, 32-wide random causal LM (SmolLM2's shape in miniature: GQA, tied embeddings)."""
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             attention_dropout=dropout, pad_token_id=0)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, pad_token_id=0,
                            bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def records() -> Records:
    """Five records of different lengths; the last is all prompt (no target: zero gradient)."""
    g = torch.Generator().manual_seed(1)
    lengths, prompts = (6, 9, 13, 7, 5), (2, 3, 4, 1, 5)
    return Records([torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths], list(prompts))


def top_lora(arch: str):
    from peft import LoraConfig, get_peft_model

    targets = ["v_proj"] if arch == "llama" else ["c_attn"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, layers_to_transform=[2, 3], lora_dropout=0.0,
                        fan_in_fan_out=arch == "gpt2", init_lora_weights=False,  # B != 0: A gets gradients too
                        task_type="CAUSAL_LM")
    return get_peft_model(tiny(arch), config)


def top_full(arch: str, norm: bool = False):
    model = tiny(arch)
    model.requires_grad_(False)
    parts = model_parts(model)
    parts.blocks[2:].requires_grad_(True)
    parts.norm.requires_grad_(norm)
    return model


def brute_force(model, recs: Records, clip: float | None):
    """Per-record gradients on the full model, one record at a time; and their clipped sum."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    per_record = []
    for i in range(len(recs)):
        batch = collate(recs, [i], pad_id=0)
        loss = per_record_loss(model(**batch.model_inputs()).logits[:, :-1], batch.targets, batch.target_mask)[0]
        per_record.append([g if g is not None else torch.zeros_like(p)
                           for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params,
                                           strict=True)])
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in grads)) for grads in per_record])
    if clip is None:
        clip = float(norms[norms > 0].median())
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    summed = [sum(f * grads[k] for f, grads in zip(factors, per_record, strict=True)) for k in range(len(params))]
    return params, per_record, norms, clip, summed


def cached_dp_step(model, recs: Records, clip: float):
    """Opacus hooks on TopBlocks over one padded physical batch of cached records; DPOptimizer clips and sums."""
    cache = build_prefix_cache(model, recs, batch_size=2)
    top = TopBlocks(model)
    gsm = GradSampleModule(top, batch_first=True, loss_reduction="mean")
    gsm.train()
    params = [p for p in gsm.parameters() if p.requires_grad]
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=len(recs), loss_reduction="mean")
    indices = list(range(len(recs)))
    batch = collate_cached(cache, collate(recs, indices, pad_id=0), indices)
    final = gsm(**batch.model_inputs())
    losses = FrozenHeadLoss.of_model(model, chunk_size=7)(final[:, :-1], batch.targets, batch.target_mask)
    losses.mean().backward()
    per_sample = {id(p): p.grad_sample.detach().clone() for p in params}
    assert optimizer.pre_step()  # clip, sum, add (zero) noise, divide by the expected batch size
    summed = {id(p): p.grad.detach() * len(recs) for p in params}
    gsm._close()
    return params, per_sample, summed


def close(actual, expected):
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(("arch", "mode"), [("llama", "lora"), ("llama", "full"), ("gpt2", "full"),
                                            ("gpt2", "lora")])
def test_clipped_per_sample_gradients_equal_the_full_model_record_by_record(arch, mode):
    model = top_lora(arch) if mode == "lora" else top_full(arch, norm=arch == "gpt2")
    recs = records()
    assert first_trainable_block(model) == 2
    params, per_record, norms, clip, summed = brute_force(model, recs, clip=None)
    assert (norms > clip * 1.001).any() and ((norms < clip * 0.999) & (norms > 0)).any()  # both branches
    assert norms[-1] == 0  # the all-prompt record
    top_params, per_sample, dp_summed = cached_dp_step(model, recs, clip)
    assert {id(p) for p in top_params} == {id(p) for p in params}  # TopBlocks trains exactly these
    for k, p in enumerate(params):
        close(per_sample[id(p)], torch.stack([grads[k] for grads in per_record]))
        close(dp_summed[id(p)], summed[k])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_top_blocks_reproduce_the_last_hidden_states(arch):
    model = top_lora(arch)
    model.train()
    recs = records()
    cache = build_prefix_cache(model, recs, batch_size=3)
    assert cache.start == 2 and len(cache) == 5 and cache.hidden_size == 32
    assert [cache.length(i) for i in range(5)] == [len(r) for r in recs.input_ids]
    top = TopBlocks(model)
    indices = [3, 0, 2, 4]
    batch = collate_cached(cache, collate(recs, indices, pad_id=0), indices)
    tokens = collate(recs, indices, pad_id=0)
    assert batch.hidden_states.shape == (4, 13, 32)  # padded to this batch's longest record
    assert torch.equal(batch.targets, tokens.targets) and torch.equal(batch.target_mask, tokens.target_mask)
    assert not batch.hidden_states[~batch.attention_mask.bool()].any()  # zeros on padding
    with torch.no_grad():
        ours = top(**batch.model_inputs())
        full = model_parts(model).body(**tokens.model_inputs()).last_hidden_state
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], full[real], rtol=1e-5, atol=1e-5)
    assert model.training and top.training  # building the cache restored the training mode


def test_detection_and_frozen_checks():
    model = top_full("llama")
    assert first_trainable_block(model) == 2 and check_frozen_prefix(model) == 2
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    assert first_trainable_block(model) == 0
    with pytest.raises(DpnbError, match="model.layers.0.mlp.up_proj.weight"):
        check_frozen_prefix(model, 2)
    embedding = top_full("llama")
    embedding.model.embed_tokens.weight.requires_grad_(True)  # tied: the head trains too
    with pytest.raises(DpnbError, match="embed_tokens"):
        TopBlocks(embedding)
    nothing = tiny("gpt2").requires_grad_(False)
    with pytest.raises(DpnbError, match="no decoder block"):
        first_trainable_block(nothing)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropout_in_the_frozen_part_is_refused(arch):
    model = tiny(arch, dropout=0.1)
    model.requires_grad_(False)
    model_parts(model).blocks[3].requires_grad_(True)
    model.train()
    with pytest.raises(DpnbError, match="attention_dropout" if arch == "llama" else "embd_pdrop"):
        TopBlocks(model)
    with pytest.raises(DpnbError, match="random in training mode"):
        build_prefix_cache(model, records())
    for block in model_parts(model).blocks[:3]:
        block.eval()
    model_parts(model).body.eval()  # the whole body, then the top block back to training
    model_parts(model).blocks[3].train()
    assert check_frozen_prefix(model) == 3  # a frozen part kept in eval mode is deterministic


def test_saved_cache_is_private_and_round_trips(tmp_path):
    model = top_lora("llama")
    recs = records()
    cache = build_prefix_cache(model, recs)
    directory = tmp_path / "private" / "prefix"
    path = cache.save(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = PrefixCache.load(directory)
    assert torch.equal(loaded.states, cache.states) and torch.equal(loaded.offsets, cache.offsets)
    assert loaded.start == 2 and loaded.meta == cache.meta
    loaded.verify(model, recs)
    with torch.no_grad():
        model_parts(model).body.embed_tokens.weight.mul_(2)
    with pytest.raises(DpnbError, match="other weights"):
        loaded.verify(model)
    other = Records([[1, 2, 3]] + recs.input_ids[1:], recs.prompt_lengths)
    with pytest.raises(DpnbError, match="other records"):
        loaded.verify(records=other)
    with pytest.raises(DpnbError, match="other records"):
        collate_cached(loaded, collate(other, [0], pad_id=0), [0])
    PrefixCache.delete(directory)
    assert not directory.exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(DpnbError, match="readable by others"):
        cache.save(shared)


def test_a_sweeps_runs_share_one_cache_per_records_and_weights(tmp_path):
    """`shared_prefix_cache` (the runs of a sweep): built once and saved privately, then mapped by the
    next run with the same records and frozen weights, holding exactly the states a run builds alone;
    other records or other frozen weights get their own cache."""
    model, recs, shared = top_lora("llama"), records(), tmp_path / "shared"
    first, where = shared_prefix_cache(model, recs, 2, 2, "cpu", 0, shared)
    assert where.startswith("built and saved")
    second, where = shared_prefix_cache(model, recs, 2, 2, "cpu", 0, shared)
    assert where.startswith("shared by the sweep's runs, mapped")
    alone = build_prefix_cache(model, recs, start=2, batch_size=2)
    for cache in (first, second):
        assert torch.equal(cache.states, alone.states) and torch.equal(cache.offsets, alone.offsets)
    (directory,) = shared.iterdir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # the states are as private as the records

    fewer = Records(recs.input_ids[:4], recs.prompt_lengths[:4])
    assert shared_prefix_cache(model, fewer, 2, 2, "cpu", 0, shared)[1].startswith("built")
    with torch.no_grad():
        model_parts(model).body.embed_tokens.weight.mul_(2)
    changed, where = shared_prefix_cache(model, recs, 2, 2, "cpu", 0, shared)
    assert where.startswith("built") and not torch.equal(changed.states, alone.states)
    assert len(list(shared.iterdir())) == 3


def test_a_damaged_shared_cache_is_built_again_never_used(tmp_path, capsys):
    model, recs, shared = top_lora("llama"), records(), tmp_path / "shared"
    built, _ = shared_prefix_cache(model, recs, 2, 2, "cpu", 0, shared)
    (directory,) = shared.iterdir()
    path = directory / "prefix_states.pt"
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], data[:-4096] + bytes([data[-4096] ^ 0x01]) + data[-4095:]):
        path.write_bytes(damaged)
        with pytest.raises(DamagedFile, match="prefix_states.pt is damaged"):
            PrefixCache.load(directory)
        cache, where = shared_prefix_cache(model, recs, 2, 2, "cpu", 0, shared)
        assert where.startswith("built and saved") and "is damaged" in capsys.readouterr().out
        assert torch.equal(cache.states, built.states)
        assert torch.equal(PrefixCache.load(directory).states, built.states)  # and replaced on disk


def test_two_sweep_jobs_building_one_cache_at_once_build_it_once(tmp_path, monkeypatch):
    """The second job waits while the first builds and saves, then maps its cache: no FileExistsError.

    The first job is held inside its build until the second has either finished on its own or is
    waiting for the first (it asks for the cache's lock): no timing decides the order.
    """
    model, recs, shared = top_lora("llama"), records(), tmp_path / "shared"
    first_building, second_on_its_way = threading.Event(), threading.Event()
    builds, outcomes = [], {}
    build, flock = frozen_prefix.build_prefix_cache, fcntl.flock

    def held_build(*args, **kwargs):
        builds.append(threading.current_thread().name)
        if threading.current_thread().name == "first":
            first_building.set()
            assert second_on_its_way.wait(timeout=120)
        return build(*args, **kwargs)

    def watched_flock(handle, operation):
        if threading.current_thread().name == "second" and operation == fcntl.LOCK_EX:
            second_on_its_way.set()
        return flock(handle, operation)

    def job() -> None:
        try:
            outcomes[threading.current_thread().name] = shared_prefix_cache(model, recs, 2, 2, "cpu", 0, shared)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcomes[threading.current_thread().name] = exc
        finally:
            second_on_its_way.set()

    monkeypatch.setattr(frozen_prefix, "build_prefix_cache", held_build)
    monkeypatch.setattr(fcntl, "flock", watched_flock)
    first, second = threading.Thread(target=job, name="first"), threading.Thread(target=job, name="second")
    first.start()
    assert first_building.wait(timeout=120)
    second.start()
    first.join(timeout=300)
    second.join(timeout=300)
    assert not isinstance(outcomes["first"], BaseException), outcomes["first"]
    assert not isinstance(outcomes["second"], BaseException), outcomes["second"]
    assert builds == ["first"] and outcomes["second"][1].startswith("shared by the sweep's runs, mapped")
    assert torch.equal(outcomes["second"][0].states, outcomes["first"][0].states)
