"""DP-SGD as dpnb runs it, checked against what it should compute: tests that can fail.

1. Clipping. One or two logical steps through dpnb's own session (`make_session`, `epoch_steps`, so
   Opacus's `BatchMemoryManager` cuts each Poisson-sampled logical batch into SEVERAL physical
   batches) with noise multiplier 0: the gradient handed to AdamW must equal
   sum_{i in B} g_i * min(1, C / (||g_i|| + 1e-6)) / E, E = int(N q), where each g_i is computed
   alone, by plain autograd on the model before Opacus wraps it. C is the median per-record norm,
   so some records are clipped and some are not. Hooks and ghost; full, LoRA, QLoRA (4-bit on the
   CPU); GPT-2 and Llama; float32 and bf16-mixed; and the frozen-prefix path (top blocks only) with
   the cache on and off. And the bound itself: for every precision setting the config accepts under
   DP, each record's contribution to the summed update (a logical step holding that record alone)
   has norm at most C up to float32 rounding; bf16 weights under DP are refused.
2. Noise. With noise, (update * E - clipped sum) must be N(0, (sigma C)^2) per coordinate, i.e. the
   update's noise has std sigma C / E: a chi-square test of the variance, a z test of the mean and a
   Kolmogorov-Smirnov test of the shape, each at false-failure probability ALPHA = 1e-6 (so < 3e-6
   for a test). Also for a logical batch that drew no record: pure noise, counted by the accountant.
3. Poisson sampling: per-record inclusion counts over many logical batches of dpnb's loader are
   Binomial(M, q) (two-sided bounds at ALPHA, Bonferroni over records), the batch size is
   Binomial(N, q) (chi-square goodness of fit), and the loader's q is the plan's q = 1 / ceil(N / B).
4. Unpredictability: deterministic=False draws other noise and other batches on every run;
   deterministic=True reproduces exactly and privacy.json says it is not a DP release.
5. Whole runs through `train()`: the prefix cache changes neither the weights (beyond float
   rounding) nor the epsilon; ghost clipping on GPT-2 trains; epsilon checked against Google's
   dp_accounting at the closed-form q and an independently counted number of noise additions.

Models: the tiny presets' shapes (2 blocks, 64 wide, GQA Llama / GPT-2, tied embeddings) with a
97-token vocabulary and random records over it, so that every case takes well under a second; the
ghost GPT-2 run through train() uses the tiny-gpt2 preset itself, on toy reviews.

Tolerances (relative L2 error of the whole update vector): float32 1e-5 (measured <= 5e-7), plus
per-tensor rtol 1e-4, atol 1e-5 x the largest entry; bf16-mixed 3e-2 (measured below 1e-2; bf16 has
an 8-bit mantissa). A missing clip, a divisor of |B| instead of E or a lost physical batch each move
the update by 10% or more here. A record's contribution: norm within C (1 +- BOUND_TOL), BOUND_TOL =
1e-5 (float32 rounding and the 1e-6 Opacus adds to each norm: measured <= 2.4e-6; bf16 weights gave
1.0041-1.0053 C).
"""

from __future__ import annotations

import dataclasses
import math

import datasets
import pytest
import torch
from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from safetensors.torch import load_file
from scipy import stats
from testkit import EOS, PAD, VOCAB, as_dataset, small_records, toy_reviews
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from dpnb.config import AuditConfig, FinetuneConfig
from dpnb.config import build as build_config
from dpnb.errors import DpnbError
from dpnb.models import load_causal_lm, load_tokenizer, quiet_transformers
from dpnb.privacy import accounting
from dpnb.privacy.independent_accounting import cross_check, google_epsilons
from dpnb.stages import audit
from dpnb.training import dpsgd, loop, train_log
from dpnb.training.frozen_prefix import frozen_prefix
from dpnb.training.loss import Records, collate, per_record_loss
from dpnb.training.plan import TrainingPlan, plan_training
from dpnb.training.trainable import build_model, is_quantized_4bit

pytestmark = [
    pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden"),  # the capture below
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]

ALPHA = 1e-6  # false-failure probability of each statistical check
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
BOUND_TOL = 1e-5  # a record's clipped contribution: norm C up to float32 rounding
BATCH_INDICES = dpsgd.batch_indices


# =========================================================================== models, records, configs


def small_lm(arch: str) -> AutoModelForCausalLM:
    """`dpnb.models.tiny_causal_lm`'s architecture with a 97-token vocabulary (same seed, same shapes)."""
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    return AutoModelForCausalLM.from_config(config)



def config(**overrides) -> FinetuneConfig:
    values = dict(mode="full", dp=True, target_epsilon=50.0, accountant="rdp", max_steps=2, logical_batch_size=6,
                  physical_batch_size=2, max_grad_norm=1.0, lr=1e-3, device="cpu", checkpoint_every=100, seed=0,
                  deterministic=True, lora_r=4)
    values.update(overrides)
    return FinetuneConfig(**values)


def lora_targets(arch: str) -> tuple[str, ...]:
    return ("q_proj", "v_proj") if arch == "llama" else ("c_attn",)


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory) -> dict[str, str]:
    """The small models saved to disk: QLoRA loads its base from a directory, in 4-bit."""
    paths = {}
    for arch in ("llama", "gpt2"):
        path = tmp_path_factory.mktemp(f"small-{arch}")
        small_lm(arch).save_pretrained(path)
        paths[arch] = str(path)
    return paths


def build(arch: str, cfg: FinetuneConfig, saved_bases: dict[str, str] | None = None):
    """The model to train, always the same for the same arguments; LoRA's B is drawn nonzero (as after
    some training) so that A has gradients too."""
    torch.manual_seed(0)
    with quiet_transformers():
        if cfg.mode == "qlora":
            model, notes = build_model(saved_bases[arch], cfg, "cpu")
            assert is_quantized_4bit(model)
        else:
            model, notes = build_model(f"small-{arch}", cfg, "cpu", base_model=small_lm(arch).to(
                getattr(torch, cfg.dtype)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.train()
    return model, notes


def fixed_noise_plan(cfg: FinetuneConfig, n: int, sigma: float) -> TrainingPlan:
    """The run's plan with a chosen noise multiplier (no calibration: these tests take a step or two)."""
    plan = plan_training(dataclasses.replace(cfg, dp=False), n)
    return dataclasses.replace(plan, dp=True, noise_multiplier=sigma, delta=accounting.default_delta(n))


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# =========================================================================== brute force and capture


def per_record_gradients(model, records: Records) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Every record's gradient g_i, one record at a time (no padding), plain autograd; and ||g_i||."""
    params = trainable(model)
    grads, norms = [], []
    for i in range(len(records)):
        model.zero_grad(set_to_none=True)
        batch = collate(records, [i], PAD)
        logits = model(**batch.model_inputs()).logits[:, :-1]
        per_record_loss(logits, batch.targets, batch.target_mask).sum().backward()
        grads.append({name: p.grad.detach().clone() for name, p in params.items()})
        norms.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads[-1].values())))
    model.zero_grad(set_to_none=True)
    return grads, norms


def clipped_sum(grads, norms, indices, clip) -> dict[str, torch.Tensor]:
    """sum_i g_i * min(1, C / (||g_i|| + 1e-6)) in float64 (Opacus's clipping formula, 1e-6 included)."""
    return {name: sum(grads[i][name].double() * min(1.0, clip / (norms[i] + 1e-6)) for i in indices)
            for name in grads[0]}


@dataclasses.dataclass
class Steps:
    physical: list[list[list[int]]]  # per logical step, its physical batches of record indices
    updates: list[dict[str, torch.Tensor]]  # per logical step, the gradient AdamW was handed
    results: list[dpsgd.StepResult]

    def drawn(self, step: int) -> list[int]:
        return [i for batch in self.physical[step] for i in batch]


def take_steps(session: dpsgd.Session, records: Records, cfg: FinetuneConfig, steps: int, monkeypatch,
               stop_at_empty: bool = False) -> Steps:
    """Run `steps` logical steps of `epoch_steps`, recording each physical batch's indices and the
    gradient each AdamW step receives; AdamW does not move the weights, so every step sees the same model."""
    physical: list[list[int]] = []

    def spy(raw):
        physical.append(BATCH_INDICES(raw))
        return physical[-1]

    monkeypatch.setattr(dpsgd, "batch_indices", spy)
    params = trainable(session.trainable)
    updates, ends = [], []

    def capture(*args, **kwargs):
        updates.append({name: p.grad.detach().clone() for name, p in params.items()})
        ends.append(len(physical))

    session.adamw.step = capture
    results = []
    stepping = dpsgd.epoch_steps(session, records, cfg, PAD, "cpu", steps, False, None)
    with quiet_transformers():
        for result in stepping:
            results.append(result)
            if stop_at_empty and result.loss is None:
                break
    stepping.close()  # leaves the BatchMemoryManager
    starts = [0, *ends[:-1]]
    return Steps([physical[a:b] for a, b in zip(starts, ends, strict=True)], updates, results)


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    g = torch.cat([got[k].double().reshape(-1) for k in want])
    w = torch.cat([want[k].double().reshape(-1) for k in want])
    return float((g - w).norm() / w.norm())


def assert_update_is_clipped_sum(steps: Steps, grads, norms, clip: float, divisor: float, dtype: torch.dtype):
    for step, update in enumerate(steps.updates):
        want = {k: v / divisor for k, v in clipped_sum(grads, norms, steps.drawn(step), clip).items()}
        assert set(update) == set(want)
        assert relative_error(update, want) <= REL_TOL[dtype], (step, relative_error(update, want))
        if dtype == torch.float32:
            for name, value in want.items():
                scale = float(value.abs().max())
                torch.testing.assert_close(update[name].double(), value, rtol=1e-4, atol=1e-5 * scale + 1e-12)


# =========================================================================== 1. clipping


CASES = [(arch, mode, gsm) for arch in ("llama", "gpt2") for mode in ("full", "lora", "qlora")
         for gsm in ("hooks", "ghost")]


@pytest.mark.parametrize(("arch", "mode", "grad_sample_mode"), CASES, ids=["-".join(case) for case in CASES])
def test_update_is_the_clipped_sum_of_per_record_gradients_over_the_expected_batch(
        arch, mode, grad_sample_mode, saved_bases, monkeypatch):
    """Two logical steps of ~9 records each (q = 1/2 of 12, E = 6), physical batches of at most 2."""
    records = small_records(12)
    cfg = config(mode=mode, grad_sample_mode=grad_sample_mode, lora_targets=lora_targets(arch))
    model, notes = build(arch, cfg, saved_bases)
    grads, norms = per_record_gradients(model, records)
    clip = sorted(norms)[len(norms) // 2]  # the median: some records are clipped, some not
    cfg = dataclasses.replace(cfg, max_grad_norm=clip)
    plan = fixed_noise_plan(cfg, len(records), 0.0)
    session = dpsgd.make_session(model, cfg, plan, "cpu")
    steps = take_steps(session, records, cfg, 2, monkeypatch)

    assert len(steps.updates) == 2 and all(len(p) >= 3 for p in steps.physical)  # several physical batches
    for step in range(2):
        drawn = steps.drawn(step)
        assert len(drawn) == len(set(drawn)) and all(len(b) <= cfg.physical_batch_size for b in steps.physical[step])
    everyone = steps.drawn(0) + steps.drawn(1)
    assert any(norms[i] > 1.01 * clip for i in everyone) and any(norms[i] < 0.99 * clip for i in everyone)
    divisor = session.optimizer.expected_batch_size
    assert divisor == int(len(records) * plan.sample_rate) == 6  # the public E, not the drawn |B|
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert_update_is_clipped_sum(steps, grads, norms, clip, divisor, torch.float32)
    assert accounting.accountant_history(session.engine.accountant) == [(0.0, plan.sample_rate, 2)]
    if grad_sample_mode == "ghost" and mode == "full":
        assert any("untied" in note for note in notes)


def record_contributions(session: dpsgd.Session, records: Records, cfg: FinetuneConfig) -> list[float]:
    """||update * E|| of logical steps that each hold one record alone (noise 0): that record's contribution
    to the summed update, in float64; AdamW does not move the weights, so every step sees the same model."""
    params = list(trainable(session.trainable).values())
    divisor = session.optimizer.expected_batch_size
    norms: list[float] = []
    session.adamw.step = lambda *a, **k: norms.append(
        math.sqrt(sum(float(((p.grad.double() * divisor) ** 2).sum()) for p in params)))
    for i in range(len(records)):
        with quiet_transformers():
            next(dpsgd.dp_logical_steps(session, iter([torch.tensor([[i]])]), records, cfg, PAD, "cpu"))
    return norms


SETTINGS = [(arch, mode, gsm, precision, dtype) for arch in ("llama", "gpt2") for mode in ("full", "lora")
            for gsm in ("hooks", "ghost") for precision in ("fp32", "bf16-mixed", "auto")
            for dtype in ("float32", "bfloat16")]


@pytest.mark.parametrize(("arch", "mode", "grad_sample_mode", "precision", "dtype"), SETTINGS,
                         ids=["-".join(case) for case in SETTINGS])
def test_no_record_moves_the_sum_by_more_than_the_clipping_bound(arch, mode, grad_sample_mode, precision, dtype):
    """Every setting the config accepts under DP: with C at half the smallest per-record norm (every record
    clipped), each record's contribution to the summed update has norm C up to float32 rounding. ("auto" is
    fp32 on a CPU; bf16-mixed runs under CPU autocast.) The settings refused are checked below."""
    try:
        cfg = config(mode=mode, grad_sample_mode=grad_sample_mode, precision=precision, dtype=dtype,
                     lora_targets=lora_targets(arch))
    except DpnbError:
        pytest.skip("refused under DP (test_bf16_weights_and_bf16_norms_are_refused_under_dp)")
    records = small_records(12)
    model, _ = build(arch, cfg)
    _, norms = per_record_gradients(model, records)
    clip = min(norms) / 2
    cfg = dataclasses.replace(cfg, max_grad_norm=clip)
    session = dpsgd.make_session(model, cfg, fixed_noise_plan(cfg, len(records), 0.0), "cpu")
    contributions = record_contributions(session, records, cfg)
    assert len(contributions) == len(records)
    assert max(contributions) <= clip * (1 + BOUND_TOL), max(contributions) / clip
    assert min(contributions) >= clip * (1 - BOUND_TOL), min(contributions) / clip  # every record clipped, to C


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_the_cpu_bf16_fast_path_keeps_the_clipping_bound(arch, monkeypatch):
    """precision auto on a CPU whose bf16 is fast (stated here; `dpnb.precision` measures it): the frozen-prefix
    cache built by a bf16 copy of the model, the frozen head's loss from a bf16 head and the top block under
    autocast. The computation really is bf16, and every record's contribution is still C to float32 rounding."""
    monkeypatch.setenv("DPNB_BF16_SPEEDUP", "5")
    records = small_records(12)
    cfg = config(mode="lora", lora_targets=lora_targets(arch), lora_top_layers=1)
    model, _ = build(arch, cfg)
    _, norms = per_record_gradients(model, records)
    clip = min(norms) / 2
    cfg = dataclasses.replace(cfg, max_grad_norm=clip)
    precision = dpsgd.compute_precision(cfg, "cpu")
    assert precision.dtype == precision.autocast == torch.bfloat16
    prefix, note = frozen_prefix(model, records, cfg, PAD, "cpu", precision=precision)
    assert prefix is not None, note
    assert prefix.cache.meta["dtype"] == "bfloat16" and prefix.cache.states.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the copy was bf16, the model is not
    session = dpsgd.make_session(model, cfg, fixed_noise_plan(cfg, len(records), 0.0), "cpu", prefix=prefix,
                                 precision=precision)
    assert session.autocast == torch.bfloat16
    contributions = record_contributions(session, records, cfg)
    assert len(contributions) == len(records)
    assert max(contributions) <= clip * (1 + BOUND_TOL), max(contributions) / clip
    assert min(contributions) >= clip * (1 - BOUND_TOL), min(contributions) / clip


def test_bf16_weights_and_bf16_norms_are_refused_under_dp():
    """bf16 trainable weights under DP (every mode, hooks or ghost), however they would arrive: in the config,
    in the audit's overrides, as the DP twin of a run trained without DP, or as a bf16 model handed to train()."""
    for mode in ("full", "lora", "qlora"):
        for gsm in ("hooks", "ghost"):
            for extra in ({}, {"top_layers": 1} if mode == "full" else {"lora_top_layers": 1}):
                with pytest.raises(DpnbError, match="precision: bf16-mixed"):
                    config(mode=mode, grad_sample_mode=gsm, dtype="bfloat16", **extra)
                config(mode=mode, grad_sample_mode=gsm, dtype="bfloat16", dp=False, **extra)  # no DP: allowed
    with pytest.raises(DpnbError, match="ghost"):
        config(precision="bf16-mixed", grad_sample_mode="ghost")
    with pytest.raises(DpnbError, match="precision: bf16-mixed"):
        build_config(AuditConfig, {"finetune_overrides": {"dtype": "bfloat16"}})
    with pytest.raises(DpnbError, match="precision: bf16-mixed"):
        audit.twin_configs(config(dp=False, dtype="bfloat16"))
    cfg = config()
    model = small_lm("llama").to(torch.bfloat16)
    with pytest.raises(DpnbError, match="float32 trainable weights, but some are bfloat16"):
        dpsgd.make_session(model, cfg, fixed_noise_plan(cfg, 12, 0.0), "cpu")


MIXED_CASES = [(arch, mode, cached) for arch in ("llama", "gpt2") for mode in ("full", "lora")
               for cached in (False, True)]


@pytest.mark.parametrize(("arch", "mode", "cached"), MIXED_CASES, ids=["-".join(map(str, c)) for c in MIXED_CASES])
def test_bf16_mixed_precision_gives_the_float32_clipped_sum(arch, mode, cached, monkeypatch):
    """precision bf16-mixed (the CUDA default, run here under CPU autocast): the update is the clipped
    sum of float32 per-record gradients within bf16's tolerance (3e-2; measured below 1e-2), the weights
    stay float32, and Opacus takes the per-sample norms from float32 gradients (promote_grad_samples)."""
    records = small_records(12)
    top = ({"lora_top_layers": 1} if mode == "lora" else {"top_layers": 1}) if cached else {}
    cfg = config(mode=mode, lora_targets=lora_targets(arch), prefix_cache=cached, **top)
    model, _ = build(arch, cfg)
    grads, norms = per_record_gradients(model, records)
    clip = sorted(norms)[len(norms) // 2]
    updates = {}
    for precision in ("fp32", "bf16-mixed"):
        run_cfg = dataclasses.replace(cfg, max_grad_norm=clip, precision=precision)
        model, _ = build(arch, run_cfg)
        prefix = frozen_prefix(model, records, run_cfg, PAD, "cpu")[0]
        assert (prefix is not None) == cached
        session = dpsgd.make_session(model, run_cfg, fixed_noise_plan(run_cfg, len(records), 0.0), "cpu",
                                     prefix=prefix)
        assert session.autocast == (torch.bfloat16 if precision == "bf16-mixed" else None)
        seen: list[torch.dtype] = []
        clip_and_accumulate = session.optimizer.clip_and_accumulate

        def spy(clip_and_accumulate=clip_and_accumulate, session=session, seen=seen):
            seen.extend(g.dtype for g in session.optimizer.grad_samples)
            return clip_and_accumulate()

        monkeypatch.setattr(session.optimizer, "clip_and_accumulate", spy)
        steps = take_steps(session, records, cfg, 1, monkeypatch)
        assert seen and set(seen) == {torch.float32}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert_update_is_clipped_sum(steps, grads, norms, clip, session.optimizer.expected_batch_size,
                                     torch.float32 if precision == "fp32" else torch.bfloat16)
        updates[precision] = steps.updates[0]
    error = relative_error(updates["bf16-mixed"], updates["fp32"])
    assert 1e-6 < error <= REL_TOL[torch.bfloat16]  # bf16 really ran, and stayed within tolerance


def test_mixed_precision_is_refused_where_it_would_round_the_norms():
    with pytest.raises(DpnbError, match="ghost"):
        config(precision="bf16-mixed", grad_sample_mode="ghost")
    with pytest.raises(DpnbError, match="float32 weights"):
        config(precision="bf16-mixed", dtype="bfloat16", dp=False)
    assert dpsgd.compute_precision(config(), "cpu").autocast is None  # auto, on a CPU stated slow in bf16


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def set_tf32_flags(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def tf32_on():
    """TF32 allowed (as compute_precision allows it on CUDA) for the test; the flags as they were after it."""
    before = tf32_flags()
    set_tf32_flags(True, True)
    yield
    set_tf32_flags(*before)


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost"])
def test_tf32_is_off_while_opacus_clips_and_sums_and_restored_after(grad_sample_mode, tf32_on, monkeypatch):
    """On CUDA, TF32 speeds up the forward and backward pass, but Opacus's clipped sum is an einsum (a matmul):
    TF32 there would round the gradients and clip factors after the norms. The flags exist on a CPU build too:
    with them on, they must be off while Opacus clips and accumulates (hooks: clip_and_accumulate; ghost:
    accumulate, after clipping in the backward pass), and on again after. On CUDA, compute_precision allows
    TF32 for hooks and keeps it off under ghost clipping, whose norms and clipped sum come from the backward."""
    records = small_records(12)
    cfg = config(grad_sample_mode=grad_sample_mode, precision="fp32")
    model, _ = build("llama", cfg)
    session = dpsgd.make_session(model, cfg, fixed_noise_plan(cfg, len(records), 0.0), "cpu")
    name = "clip_and_accumulate" if grad_sample_mode == "hooks" else "accumulate"
    original, seen = getattr(session.optimizer, name), []

    def spy(*args, **kwargs):
        seen.append(tf32_flags())
        return original(*args, **kwargs)

    monkeypatch.setattr(session.optimizer, name, spy)
    steps = take_steps(session, records, cfg, 1, monkeypatch)
    assert len(seen) == len(steps.physical[0]) >= 3 and set(seen) == {(False, False)}
    assert tf32_flags() == (True, True)  # restored for the next forward and backward pass
    dpsgd.compute_precision(cfg, "cuda")
    assert tf32_flags() == ((True, True) if grad_sample_mode == "hooks" else (False, False))


TOP_CASES = [(arch, how) for arch in ("llama", "gpt2") for how in ("lora_top_layers", "top_layers")]


@pytest.mark.parametrize(("arch", "how"), TOP_CASES, ids=["-".join(case) for case in TOP_CASES])
def test_frozen_prefix_cache_gives_the_same_clipped_sum(arch, how, monkeypatch):
    """Top-block training: the cached path (blocks below run once, fused head loss) and the whole-model
    path both give the brute-force clipped sum of the FULL model's per-record gradients, and each other's."""
    records = small_records(12)
    top = {"lora_top_layers": 1} if how == "lora_top_layers" else {"top_layers": 1}
    mode = "lora" if how == "lora_top_layers" else "full"
    cfg = config(mode=mode, lora_targets=lora_targets(arch), **top)
    model, _ = build(arch, cfg)
    grads, norms = per_record_gradients(model, records)
    clip = sorted(norms)[len(norms) // 2]
    got = {}
    for cached in (True, False):
        cfg = dataclasses.replace(cfg, max_grad_norm=clip, prefix_cache=cached)
        model, _ = build(arch, cfg)
        prefix, note = frozen_prefix(model, records, cfg, PAD, "cpu")
        assert (prefix is not None) == cached, note
        if cached:
            assert prefix.top.start == 1 and "blocks 0-0 run once" in note
        session = dpsgd.make_session(model, cfg, fixed_noise_plan(cfg, len(records), 0.0), "cpu", prefix=prefix)
        steps = take_steps(session, records, cfg, 1, monkeypatch)
        assert len(steps.physical[0]) >= 3
        assert_update_is_clipped_sum(steps, grads, norms, clip, session.optimizer.expected_batch_size,
                                     torch.float32)
        got[cached] = steps
    assert got[True].physical == got[False].physical  # deterministic: the same Poisson draw
    assert relative_error(got[True].updates[0], got[False].updates[0]) <= REL_TOL[torch.float32]
    ghost = dataclasses.replace(cfg, prefix_cache=True, grad_sample_mode="ghost")
    assert frozen_prefix(model, records, ghost, PAD, "cpu")[0] is None  # the cache runs with hooks only


# =========================================================================== 2. noise


def assert_gaussian(noise: torch.Tensor, std: float) -> None:
    """noise ~ N(0, std^2) iid: variance (chi-square), mean (z) and shape (KS), each at ALPHA two-sided."""
    x = noise.double().reshape(-1) / std
    n = x.numel()
    assert n >= 50_000  # the variance is then pinned to +-2.3% (+-1.2% in std)
    sum_sq = float((x * x).sum())
    low, high = stats.chi2.ppf(ALPHA / 2, n), stats.chi2.isf(ALPHA / 2, n)
    assert low <= sum_sq <= high, f"variance / expected = {sum_sq / n:.4f}, allowed [{low / n:.4f}, {high / n:.4f}]"
    z = float(x.sum()) / math.sqrt(n)
    assert abs(z) <= stats.norm.isf(ALPHA / 2), f"noise mean is {z:.2f} standard errors from 0"
    sample = x[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:200_000]].numpy()
    assert stats.kstest(sample, "norm").pvalue >= ALPHA


def lora_everywhere(**overrides) -> FinetuneConfig:
    """LoRA with r = 64 on all 7 Llama projections: 131,072 trainable coordinates."""
    return config(mode="lora", lora_r=64, lora_alpha=64, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"),
                  **overrides)


@pytest.mark.parametrize("kind", ["ghost-full", "hooks-lora"])
def test_noise_has_std_sigma_clip_over_expected_batch(kind, monkeypatch):
    sigma, clip = 0.8, 0.05
    records = small_records(12)
    if kind == "ghost-full":  # untied: 87k coordinates
        cfg = config(mode="full", grad_sample_mode="ghost", max_grad_norm=clip, deterministic=False)
    else:
        cfg = lora_everywhere(max_grad_norm=clip, deterministic=False)
    model, _ = build("llama", cfg)
    grads, norms = per_record_gradients(model, records)
    assert min(norms) > clip  # every record clipped: the signal's norm is at most |B| C
    plan = fixed_noise_plan(cfg, len(records), sigma)
    session = dpsgd.make_session(model, cfg, plan, "cpu")
    steps = take_steps(session, records, cfg, 1, monkeypatch)
    divisor = session.optimizer.expected_batch_size
    signal = clipped_sum(grads, norms, steps.drawn(0), clip)
    noise = torch.cat([(steps.updates[0][k].double() * divisor - signal[k]).reshape(-1) for k in signal])
    assert_gaussian(noise, sigma * clip)  # i.e. the update's noise has std sigma * C / E per coordinate
    assert accounting.accountant_history(session.engine.accountant) == [(sigma, plan.sample_rate, 1)]


@pytest.mark.parametrize("kind", ["ghost-full", "hooks-lora"])
def test_a_logical_batch_without_records_adds_noise_and_counts_as_a_step(kind, monkeypatch):
    """q = 1/16 over 16 records: a logical batch is empty with probability (15/16)^16 = 0.36; stepping
    until one is (at most 80 steps: P(none) < 1e-15). Its update must be pure noise, std sigma C / E."""
    sigma, clip = 1.3, 0.05
    records = small_records(16)
    common = dict(logical_batch_size=1, physical_batch_size=1, max_grad_norm=clip, deterministic=False)
    cfg = (config(mode="full", grad_sample_mode="ghost", **common) if kind == "ghost-full"
           else lora_everywhere(**common))
    model, _ = build("llama", cfg)
    plan = fixed_noise_plan(cfg, len(records), sigma)
    session = dpsgd.make_session(model, cfg, plan, "cpu")
    steps = take_steps(session, records, cfg, 80, monkeypatch, stop_at_empty=True)
    taken = len(steps.updates)
    assert steps.results[-1].loss is None and steps.results[-1].batch_size == 0 and steps.drawn(taken - 1) == []
    update = torch.cat([u.reshape(-1) for u in steps.updates[-1].values()])
    divisor = session.optimizer.expected_batch_size
    assert divisor == 1
    assert_gaussian(update * divisor, sigma * clip)
    assert accounting.accountant_history(session.engine.accountant) == [(sigma, 1 / 16, taken)]
    assert dpsgd.accounted_steps(session, plan) == taken


# =========================================================================== 3. Poisson sampling


def test_poisson_sampling_includes_each_record_with_probability_q():
    """N = 22, B = 5: q = 1/ceil(22/5) = 0.2 (not B/N = 0.227); 3,000 logical batches of dpnb's loader."""
    n, batch, draws = 22, 5, 3000
    cfg = config(mode="lora", logical_batch_size=batch, physical_batch_size=batch, deterministic=False,
                 lora_targets=lora_targets("llama"))
    model, _ = build("llama", cfg)
    plan = fixed_noise_plan(cfg, n, 1.0)
    session = dpsgd.make_session(model, cfg, plan, "cpu")
    q = 1 / math.ceil(n / batch)
    assert plan.sample_rate == q == session.loader.sample_rate and len(session.loader) == plan.steps_per_epoch == 5
    session.loader.batch_sampler.steps = draws
    counts, sizes = torch.zeros(n, dtype=torch.long), []
    for raw in session.loader:
        indices = dpsgd.batch_indices(raw)
        assert len(indices) == len(set(indices))  # without replacement within a batch
        counts[indices] += 1
        sizes.append(len(indices))
    assert len(sizes) == draws
    # each record: Binomial(draws, q), two-sided at ALPHA / n each (Bonferroni over the records)
    low, high = stats.binom.ppf(ALPHA / (2 * n), draws, q), stats.binom.isf(ALPHA / (2 * n), draws, q)
    assert all(low <= c <= high for c in counts.tolist()), (counts.tolist(), low, high)
    total = int(counts.sum())  # Binomial(n * draws, q): pinned to +-4%, far from B/N's +13%
    assert stats.binom.ppf(ALPHA / 2, n * draws, q) <= total <= stats.binom.isf(ALPHA / 2, n * draws, q)
    # batch sizes vary as Binomial(n, q): chi-square goodness of fit, sizes pooled into bins expecting >= 20
    assert len(set(sizes)) >= 6
    observed = torch.bincount(torch.tensor(sizes), minlength=n + 1).double()
    expected = torch.tensor(stats.binom.pmf(range(n + 1), n, q)) * draws
    bins, obs, exp = [], 0.0, 0.0
    for k in range(n + 1):
        obs, exp = obs + float(observed[k]), exp + float(expected[k])
        if exp >= 20 and float(expected[k + 1:].sum()) >= 20:
            bins.append((obs, exp))
            obs, exp = 0.0, 0.0
    bins[-1] = (bins[-1][0] + obs, bins[-1][1] + exp)
    assert stats.chisquare([b[0] for b in bins], [b[1] for b in bins]).pvalue >= ALPHA


# =========================================================================== 4. unpredictable noise


def test_noise_generators_draw_from_os_entropy_unless_deterministic():
    seeds = [tuple(g.initial_seed() for g in dpsgd.noise_generators(config(deterministic=False), "cpu"))
             for _ in range(2)]
    assert seeds[0] != seeds[1] and seeds[0][0] != seeds[0][1]
    assert tuple(g.initial_seed() for g in dpsgd.noise_generators(config(seed=7), "cpu")) == (7, 8)


@pytest.mark.parametrize("deterministic", [False, True])
def test_two_sessions_draw_other_noise_and_batches_unless_deterministic(deterministic, monkeypatch):
    records = small_records(16)
    cfg = lora_everywhere(logical_batch_size=4, physical_batch_size=4, deterministic=deterministic,
                          max_grad_norm=0.05)
    draws, noise = [], []
    for _ in range(2):
        model, _ = build("llama", cfg)
        session = dpsgd.make_session(model, cfg, fixed_noise_plan(cfg, len(records), 1.0), "cpu")
        session.loader.batch_sampler.steps = 12
        draws.append([dpsgd.batch_indices(raw) for raw in session.loader])
        # the same fixed batch in both sessions: the updates differ only by their noise
        params = list(trainable(model).values())
        session.adamw.step = lambda params=params: noise.append(torch.cat([p.grad.reshape(-1) for p in params]))
        with quiet_transformers():
            next(dpsgd.dp_logical_steps(session, iter([torch.tensor([[0], [5], [9]])]), records, cfg, PAD, "cpu"))
    assert (draws[0] == draws[1]) == deterministic
    assert torch.equal(noise[0], noise[1]) == deterministic
    if not deterministic:  # independent: the difference of two draws has twice the variance
        assert_gaussian((noise[0] - noise[1]).double() * 4, math.sqrt(2) * 0.05)


def test_deterministic_runs_reproduce_and_are_not_a_dp_release(tmp_path, tokenizer):
    records = small_records(16)
    cfg = config(mode="lora", lora_targets=lora_targets("llama"), logical_batch_size=4, physical_batch_size=2,
                 max_steps=2)
    outputs = {}
    for deterministic in (True, False):
        for run in range(2):
            out = tmp_path / f"{deterministic}-{run}"
            record = loop.train("small-llama", as_dataset(records), dataclasses.replace(
                cfg, deterministic=deterministic), out, tokenizer=tokenizer, base_model=small_lm("llama"),
                verbose=False)
            log = [{k: v for k, v in r.items() if k != "wall_s"} for r in train_log.read_train_log(out)]
            outputs[deterministic, run] = (record, log, load_file(out / "model" / "adapter_model.safetensors"))
    for deterministic in (True, False):
        (rec_a, log_a, w_a), (rec_b, log_b, w_b) = outputs[deterministic, 0], outputs[deterministic, 1]
        assert rec_a == rec_b  # same settings, same guarantee
        same = all(torch.equal(w_a[k], w_b[k]) for k in w_a)
        assert same == deterministic and (log_a == log_b) == deterministic
        assert rec_a["deterministic"] is deterministic and rec_a["dp_release"] is (not deterministic)
    noted = outputs[True, 0][0]
    assert noted["noise_seeded_from"] == "the config seed" and "NOT a DP release" in noted["release_note"]
    assert "OS entropy" in outputs[False, 0][0]["noise_seeded_from"]


# =========================================================================== 5. whole runs


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


@pytest.fixture
def noise_additions(monkeypatch) -> list[int]:
    """Counts the noise additions of every Opacus optimizer (hooks and ghost), independently of the accountant."""
    calls: list[int] = []
    for cls in (DPOptimizer, DPOptimizerFastGradientClipping):
        original = cls.add_noise

        def counted(self, _original=original):
            calls.append(1)
            return _original(self)

        monkeypatch.setattr(cls, "add_noise", counted)
    return calls


def assert_epsilon_is_independently_right(record: dict, n: int, batch: int, steps: int) -> None:
    """The record's q, T, delta are the closed-form / counted ones, and its epsilon is Google's for them."""
    assert record["sample_rate"] == 1 / math.ceil(n / batch)
    assert record["steps"] == steps
    assert record["delta"] == pytest.approx(1 / n**1.1, rel=1e-12)
    assert cross_check(record)["agrees"]
    kind = {"prv": "pld", "rdp": "rdp"}[record["accountant"]]
    google = google_epsilons(record["noise_multiplier"], 1 / math.ceil(n / batch), steps, 1 / n**1.1)[kind]
    assert record["epsilon"] == pytest.approx(google, rel=0.02, abs=0.02)
    assert record["epsilon"] <= record["target_epsilon"]


def test_prefix_cache_changes_neither_the_weights_nor_the_epsilon(tmp_path, tokenizer, noise_additions):
    """LoRA on the top block through train() (mode full + top_layers: the session-level test above)."""
    records = small_records(16)
    cfg = config(mode="lora", lora_targets=lora_targets("llama"), lora_top_layers=1, logical_batch_size=4,
                 physical_batch_size=2, max_steps=3, lr=1e-2)
    runs = {}
    for cached in (True, False):
        noise_additions.clear()
        out = tmp_path / str(cached)
        record = loop.train("small-llama", as_dataset(records), dataclasses.replace(cfg, prefix_cache=cached), out,
                                tokenizer=tokenizer, base_model=small_lm("llama"), verbose=False)
        assert len(noise_additions) == 3
        assert_epsilon_is_independently_right(record, 16, 4, 3)
        runs[cached] = record, load_file(out / "model" / "adapter_model.safetensors"), train_log.read_train_log(out)
    (cached, w_cached, log_cached), (whole, w_whole, log_whole) = runs[True], runs[False]
    assert cached["epsilon"] == whole["epsilon"] and cached["steps"] == whole["steps"] == 3
    # same noise and batches (deterministic); float32, 3 AdamW steps of lr 1e-2 (each moves a weight by up to
    # 1e-2): measured max difference 7e-8
    assert w_cached.keys() == w_whole.keys()
    for key in w_whole:
        torch.testing.assert_close(w_cached[key], w_whole[key], rtol=0, atol=1e-5)
    assert [r["loss"] is None for r in log_cached] == [r["loss"] is None for r in log_whole]
    assert [r["loss"] for r in log_cached if r["loss"] is not None] == pytest.approx(
        [r["loss"] for r in log_whole if r["loss"] is not None], rel=1e-5)


def test_ghost_clipping_trains_gpt2_through_train(tmp_path, tokenizer, noise_additions):
    ids, prompts = [], []
    for row in toy_reviews(32):
        prompt = tokenizer(f"{('negative', 'positive')[row['label']]} | ", add_special_tokens=False)["input_ids"]
        ids.append(prompt + tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        prompts.append(len(prompt))
    data = datasets.Dataset.from_dict({"input_ids": ids, "prompt_length": prompts})
    cfg = config(grad_sample_mode="ghost", logical_batch_size=8, physical_batch_size=4, max_steps=2,
                 deterministic=False)
    record = loop.train("tiny-gpt2", data, cfg, tmp_path, tokenizer=tokenizer, verbose=False)
    assert len(noise_additions) == 2
    assert record["grad_sample_mode"] == "ghost" and record["dp_release"] is True
    assert_epsilon_is_independently_right(record, 32, 8, 2)
    fresh = load_causal_lm("tiny-gpt2")
    vocab, width = fresh.get_input_embeddings().weight.shape
    # every weight trains, and ghost clipping gave the (tied) LM head its own copy of the embedding
    assert record["trainable_parameters"] == sum(p.numel() for p in fresh.parameters()) + vocab * width
    trained = load_file(tmp_path / "model" / "model.safetensors")
    before = fresh.state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in trained if k in before)
    log = train_log.read_train_log(tmp_path)
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in log) and len(log) == 3
