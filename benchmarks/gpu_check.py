"""The paper's configuration at GPU speed: a check that runs in under 8 minutes on one H200, offline.

    bash benchmarks/gpu_wheels.sh                 # here, with PyPI: the wheels the GPU machine lacks
    bash benchmarks/gpu_check.sh                  # there: installs them, runs this file under a timeout
    .venv/bin/python benchmarks/gpu_check.py --smoke --json   # the same code on the CPU, tiny shapes (< 1 min)

Every model has random weights at the paper models' shapes (no download, no tokenizer: random token ids
are as good as real ones for timing), so only speed and memory mean anything, never a loss.

a. Clipping on CUDA against a per-record loop. One logical step through dpnb's own DP session
   (`dpsgd.make_session` + `dpsgd.epoch_steps`, so Opacus's BatchMemoryManager cuts the logical batch into
   3 physical batches) with noise multiplier 0; the gradient AdamW receives must equal
   sum_i g_i min(1, C / (||g_i|| + 1e-6)) / E, each g_i computed alone by plain autograd in float32 (TF32
   off), E = int(N q) the public divisor, C the median per-record norm (some records clipped, some not).
   Cases: hooks fp32 (TF32 matmuls, as dpnb runs float32 on CUDA), hooks fp32 with TF32 off, hooks
   bf16-mixed (finetune.precision), ghost (TF32 off, as dpnb runs it: it clips inside the backward pass),
   and QLoRA (4-bit base, bf16 compute) when bitsandbytes imports. Tolerances (relative L2 error of the
   whole update): 1e-4 true float32 (1e-5 on the CPU), 1e-2 TF32, 3e-2 bf16 (8-bit mantissa). A missing
   clip, a divisor of |B| instead of E or a lost physical batch each move the update by 10% or more.
   And TF32 kept out of the clipped sum: hooks fp32 with TF32 on for the forward and backward pass,
   against the float64 clipped sum of Opacus's OWN per-sample gradients (captured as clip_and_accumulate
   starts) at 1e-5, with TF32 off while it ran (TF32 inside the sum's einsum would round the gradients and
   clip factors to 10-bit mantissas, an error near 1e-3).
b. Fine-tuning speed per paper model, read from configs/paper.yaml with dpnb's sweep loader (model,
   mode, physical batch, grad_sample_mode, precision, dtype, LoRA settings): one warm-up logical step of
   one physical batch, then one timed logical step of 4 full physical batches of 300-token records (every
   record the full 300 tokens: an upper bound, IMDb reviews are often shorter), through the same session
   objects training uses (clip, one noise addition, AdamW). Fixed logical batches instead of Poisson ones
   (same work per step). The timed step adds noise and steps AdamW once per 4 physical batches where the
   paper's logical batch of 1028 does it once per 1028 / B: a slight overestimate. Peak memory is
   torch.cuda.max_memory_allocated; a batch that runs out of memory is halved until one fits, and the
   table uses the largest that fit. Extrapolated: 25,000 records x 5 epochs.
c. Sampling tokens/s per model with the fast sampler `dpnb.generation.decoding` (the engine the generate stage picks for
   GPT-2 and Llama without vLLM; `dpnb.generation.engines`), bf16, at generate.batch_size rows; Llama also as
   4-bit + LoRA (the tuned model's path; the zero-shot base runs in bf16). Random weights almost never
   emit EOS, so every row runs to max_new_tokens: the extrapolation to 2 x 25,000 samples x 300 new
   tokens is an upper bound. On gpt2's shape also HF generate at the same settings (the ratio), and on
   tiny GPT-2 and Llama models the fast sampler's greedy tokens must equal HF generate's (fp32, TF32 off).
d. One DistilBERT training step at batch 64 x 300 tokens (random-init DistilBertConfig, float32 as
   `dpnb.evaluation.classifier.train_classifier` runs it: forward, backward, clip_grad_norm, AdamW) and one prediction
   batch. Extrapolated per classifier: 2 epochs x 25,000 / 64 steps + 25,000 test predictions. The gpt2
   run's evaluate trains 3 classifiers (real, synthetic, zero-shot); each other model 2 (the real one is
   trained once per sweep). MAUVE, the memorisation screen and prepare are not included.
e. A table: model | fine-tune h | sample h | evaluate h | total h, the sweep total, and the targets
   (the gpt2 run under 15 minutes, the five-model sweep under 4 hours), pass or fail.

--json prints one JSON object last. --budget (seconds) skips what would not fit, saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message=".*(Full backward hook|is_gradient_checkpointing|Secure RNG|gemm_4bit|"
                                          "Optimal order|sample_rate|optimizer.step|MatMul8bitLt|Linear4bit).*")

import torch  # noqa: E402
from bench_finetune import FixedBatches  # noqa: E402  (benchmarks/ is this script's directory)
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
)

from dpnb.config import FinetuneConfig  # noqa: E402
from dpnb.generation import decoding, engines  # noqa: E402
from dpnb.generation.fast_forward import is_supported, unwrap  # noqa: E402
from dpnb.generation.next_token import SamplingSettings  # noqa: E402
from dpnb.models import quiet_transformers  # noqa: E402
from dpnb.privacy import accounting  # noqa: E402
from dpnb.sweep import sweep_configs  # noqa: E402
from dpnb.training import dpsgd  # noqa: E402
from dpnb.training.loss import Records, collate, per_record_loss  # noqa: E402
from dpnb.training.plan import plan_training  # noqa: E402
from dpnb.training.trainable import build_model, trainable_parameters  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny shapes (< 1 minute)")
parser.add_argument("--json", action="store_true", help="print one JSON object last")
parser.add_argument("--config", default=str(ROOT / "configs" / "paper.yaml"), help="the paper's sweep config")
parser.add_argument("--models", help="comma-separated subset of the sweep's models (default: all)")
parser.add_argument("--budget", type=float, help="seconds for the whole check (default 450; --smoke 300)")
args = parser.parse_args()

STARTED = time.perf_counter()
BUDGET = args.budget or (300.0 if args.smoke else 450.0)
SMOKE = args.smoke
if not SMOKE and not torch.cuda.is_available():
    sys.exit("gpu_check.py: no CUDA GPU visible to torch; run it on the GPU machine, or pass --smoke here")
DEVICE = "cpu" if SMOKE else "cuda"
if SMOKE:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
GPU = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (CPU smoke run)"
RESULT: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": DEVICE, "gpu": GPU,
                "torch": torch.__version__, "smoke": SMOKE, "notes": []}

# the paper's data and its sizes (configs/paper.yaml's recipe)
N_TRAIN, EPOCHS, N_SAMPLES, NEW_TOKENS, N_TEST = 25_000, 5, 2 * 25_000, 300, 25_000
TOKENS = 16 if SMOKE else 300  # tokens per training record (prepare.max_length)
TIMED_BATCHES = 2 if SMOKE else 4  # physical batches in the timed logical step
VOCAB_SMOKE = 1000
GPT2_SHAPES = {"gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20),
               "gpt2-xl": (48, 1600, 25)}  # n_layer, n_embd, n_head


def elapsed() -> float:
    return time.perf_counter() - STARTED


def left() -> float:
    return BUDGET - elapsed()


def say(text: str) -> None:
    print(f"[{elapsed():6.1f}s] {text}", flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else None


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


say(f"gpu_check: {RESULT['date']}, GPU {GPU}, torch {torch.__version__}, budget {BUDGET:.0f} s"
    + (" (SMOKE: tiny shapes on the CPU; the figures mean nothing)" if SMOKE else ""))
try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB, BNB_WHY = True, ""
except Exception as exc:  # noqa: BLE001 - any import failure means: no QLoRA here
    HAVE_BNB, BNB_WHY = False, f"bitsandbytes does not import ({type(exc).__name__}: {str(exc)[:120]})"
    say(f"QLoRA parts skipped: {BNB_WHY}")
    RESULT["notes"].append(f"QLoRA skipped: {BNB_WHY}")


def fixed_session(model, cfg: FinetuneConfig, sizes: list[int], sigma: float) -> dpsgd.Session:
    """dpnb's DP session over records 0..sum(sizes)-1, its logical batches fixed to `sizes`, noise sigma
    given (no calibration: one sigma costs what another does)."""
    n = sum(sizes)
    plan = plan_training(dataclasses.replace(cfg, dp=False), n)
    plan = dataclasses.replace(plan, dp=True, noise_multiplier=sigma, delta=accounting.default_delta(n))
    with quiet_transformers():
        session = dpsgd.make_session(model, cfg, plan, DEVICE)
    ends = [sum(sizes[: k + 1]) for k in range(len(sizes))]
    batches = [list(range(end - size, end)) for end, size in zip(ends, sizes, strict=True)]
    session.loader = DataLoader(session.loader.dataset, batch_sampler=FixedBatches(batches),
                                collate_fn=session.loader.collate_fn)
    return session


def run_steps(session: dpsgd.Session, records: Records, cfg: FinetuneConfig, pad_id: int,
              steps: int) -> list[float]:
    """Wall seconds of each of the next `steps` logical steps."""
    walls, wall = [], time.perf_counter()
    with quiet_transformers():
        for _ in dpsgd.epoch_steps(session, records, cfg, pad_id, DEVICE, steps, False, None):
            sync()
            now = time.perf_counter()
            walls.append(now - wall)
            wall = now
    return walls


# =========================================================================== a. clipping against a per-record loop

say("a. clipping on the device against a per-record loop (one logical step, 3 physical batches, noise 0)")
SMALL_VOCAB, SMALL_PAD = 97, 2


def small_lm(arch: str):
    """The unit tests' small models: 2 blocks, 64 wide, 97-token vocabulary, no dropout."""
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True, pad_token_id=SMALL_PAD, bos_token_id=1, eos_token_id=2)
    else:
        config = GPT2Config(vocab_size=SMALL_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=SMALL_PAD, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config)


def small_records(n: int) -> Records:
    g = torch.Generator().manual_seed(1)
    ids, prompts = [], []
    for _ in range(n):
        length = int(torch.randint(6, 16, (1,), generator=g))
        ids.append(torch.randint(3, SMALL_VOCAB, (length,), generator=g).tolist() + [2])
        prompts.append(int(torch.randint(1, 4, (1,), generator=g)))
    return Records(ids, prompts)


CLIP_CASES = [  # name, arch, mode, grad_sample_mode, precision, TF32 in the DP step, tolerance
    ("gpt2 full hooks fp32 (TF32)", "gpt2", "full", "hooks", "fp32", True, 1e-2),
    ("llama full hooks fp32 (TF32 off)", "llama", "full", "hooks", "fp32", False, 1e-5 if SMOKE else 1e-4),
    ("gpt2 full hooks bf16-mixed", "gpt2", "full", "hooks", "bf16-mixed", True, 3e-2),
    ("llama full hooks bf16-mixed", "llama", "full", "hooks", "bf16-mixed", True, 3e-2),
    ("gpt2 full ghost fp32 (TF32 off)", "gpt2", "full", "ghost", "fp32", False, 1e-5 if SMOKE else 1e-4),
    ("llama qlora hooks (4-bit, r=4 q,v)", "llama", "qlora", "hooks", "auto", True, 3e-2),
    ("gpt2 full hooks fp32 (TF32, fp32 sum)", "gpt2", "full", "hooks", "fp32", True, 1e-5),
]
OWN_SAMPLES = "gpt2 full hooks fp32 (TF32, fp32 sum)"  # checked against Opacus's own per-sample gradients


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def capture_samples(optimizer) -> list:
    """Wrap `optimizer.clip_and_accumulate`: keep each physical batch's per-sample gradients (float64) and the
    TF32 flags the clipping ran under."""
    seen: list = []
    original = optimizer.clip_and_accumulate

    def spy() -> None:
        seen.append(([g.detach().double().clone() for g in optimizer.grad_samples], tf32_flags()))
        original()

    optimizer.clip_and_accumulate = spy
    return seen


def clipped_sum_of(samples: list, names: list[str], clip: float, divisor: float) -> dict[str, torch.Tensor]:
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i / E in float64 from per-sample gradients (Opacus's formula)."""
    per_param = [torch.cat([batch[j] for batch in samples]) for j in range(len(names))]
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in per_param], dim=1).norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", factors, g) / divisor for k, g in zip(names, per_param, strict=True)}


RESULT["clipping"] = []
saved_llama = tempfile.mkdtemp(prefix="gpu-check-llama-")
small_lm("llama").save_pretrained(saved_llama)  # QLoRA loads its base from a directory, in 4-bit
for name, arch, mode, gsm, precision, tf32, tol in CLIP_CASES:
    if mode == "qlora" and not HAVE_BNB:
        RESULT["clipping"].append({"case": name, "skipped": BNB_WHY})
        continue
    try:
        started = time.perf_counter()
        records = small_records(12)
        cfg = FinetuneConfig(mode=mode, dp=True, accountant="rdp", logical_batch_size=6, physical_batch_size=4,
                             max_grad_norm=1.0, lr=1e-3, device=DEVICE, deterministic=True, seed=0, lora_r=4,
                             lora_targets=("q_proj", "v_proj"), grad_sample_mode=gsm, precision=precision,
                             dtype="float32", checkpoint_every=100)
        torch.manual_seed(0)
        with quiet_transformers():
            if mode == "qlora":
                model, _ = build_model(saved_llama, cfg, DEVICE)
            else:
                model, _ = build_model(f"small-{arch}", cfg, DEVICE, base_model=small_lm(arch).to(DEVICE))
        torch.manual_seed(1)
        with torch.no_grad():  # LoRA's B nonzero (as after some training), so that A has gradients too
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(std=0.1)
        model.train()
        params = {pname: p for pname, p in model.named_parameters() if p.requires_grad}
        # the brute force: every record alone, plain autograd, float32 with TF32 off, accumulated in float64
        set_tf32(False)
        grads, norms = [], []
        for i in range(len(records)):
            model.zero_grad(set_to_none=True)
            batch = collate(records, [i], SMALL_PAD).to(DEVICE)
            logits = model(**batch.model_inputs()).logits[:, :-1]
            per_record_loss(logits, batch.targets, batch.target_mask).sum().backward()
            grads.append({k: p.grad.detach().double().clone() for k, p in params.items()})
            norms.append(math.sqrt(sum(float((g**2).sum()) for g in grads[-1].values())))
        model.zero_grad(set_to_none=True)
        clip = sorted(norms)[len(norms) // 2]
        cfg = dataclasses.replace(cfg, max_grad_norm=clip)
        session = fixed_session(model, cfg, [len(records)], sigma=0.0)  # make_session sets TF32 on CUDA
        set_tf32(tf32 and DEVICE == "cuda")
        captured: list[dict[str, torch.Tensor]] = []

        def capture(*_, captured=captured, params=params) -> None:  # the gradient AdamW is handed; weights stay
            captured.append({k: p.grad.detach().double().clone() for k, p in params.items()})

        session.adamw.step = capture
        own = capture_samples(session.optimizer) if name == OWN_SAMPLES else None
        run_steps(session, records, cfg, SMALL_PAD, 1)
        divisor = session.optimizer.expected_batch_size
        if own is None:  # against the per-record loop
            want = {k: sum(grads[i][k] * min(1.0, clip / (norms[i] + 1e-6)) for i in range(len(records))) / divisor
                    for k in params}
        else:  # against Opacus's own per-sample gradients (TF32 in the passes changes them, not their clipped sum)
            want = clipped_sum_of([batch for batch, _ in own], list(params), clip, divisor)
        tf32_in_clipping = own is not None and any(flags != (False, False) for _, flags in own)
        got_flat = torch.cat([captured[0][k].reshape(-1) for k in params])
        want_flat = torch.cat([want[k].reshape(-1) for k in params])
        error = float((got_flat - want_flat).norm() / want_flat.norm())
        clipped = sum(n > clip * 1.01 for n in norms)
        row = {"case": name, "rel_error": error, "tol": tol,
               "ok": bool(error <= tol and len(captured) == 1 and not tf32_in_clipping),
               "divisor": divisor, "clipped": clipped, "records": len(records), "trainable": len(want_flat),
               "autocast": str(session.autocast), "tf32_in_clipping": tf32_in_clipping,
               "seconds": time.perf_counter() - started}
        say(f"  {name:38} rel. error {error:.2e} (tol {tol:.0e}) {'ok' if row['ok'] else 'FAIL'}; E={divisor}, "
            f"{clipped}/{len(records)} clipped, autocast {session.autocast}"
            + ("; TF32 WAS ON while Opacus summed" if tf32_in_clipping else ""))
        del model, session, grads
    except Exception as exc:  # noqa: BLE001 - reported as a failed case; the rest of the check goes on
        row = {"case": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        say(f"  {name:38} ERROR {row['error']}")
    RESULT["clipping"].append(row)
    free()
set_tf32(False)

# greedy equality: the fast sampler against HF generate on the device (this path had never run on CUDA)
RESULT["greedy"] = []
for arch in ("gpt2", "llama"):
    try:
        model = small_lm(arch).to(DEVICE).eval()
        g = torch.Generator().manual_seed(2)
        prompts = torch.randint(3, SMALL_VOCAB, (4, 5), generator=g)
        fast = decoding.continue_prompts(model, prompts.tolist(),
                                         SamplingSettings(max_new_tokens=20, do_sample=False, batch_size=4))
        with torch.inference_mode():
            hf = model.generate(input_ids=prompts.to(DEVICE), attention_mask=torch.ones_like(prompts).to(DEVICE),
                                do_sample=False, max_new_tokens=20, min_new_tokens=20, eos_token_id=None,
                                pad_token_id=SMALL_PAD)
        same = all(list(tokens) == hf[i, 5:].tolist() for i, (tokens, _) in enumerate(fast))
        RESULT["greedy"].append({"arch": arch, "ok": same})
        say(f"  greedy fast sampler == HF generate ({arch}, 4 prompts x 20 tokens): {'ok' if same else 'FAIL'}")
        del model
    except Exception as exc:  # noqa: BLE001
        RESULT["greedy"].append({"arch": arch, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        say(f"  greedy check {arch}: ERROR {RESULT['greedy'][-1]['error']}")
    free()

# =========================================================================== b., c. per paper model

say("b. fine-tuning per paper model (configs/paper.yaml), c. sampling")
runs = {run.model: run for run in sweep_configs(args.config)}
wanted = args.models.split(",") if args.models else list(runs)
RESULT["models"] = {}


def model_config(name: str, dtype: torch.dtype):
    """A transformers config at the paper model's shape (tiny in --smoke)."""
    if name.startswith("llama"):
        if SMOKE:
            return LlamaConfig(vocab_size=VOCAB_SMOKE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype=dtype)
        return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype=dtype)
    layers, width, heads = (2, 64, 4) if SMOKE else GPT2_SHAPES[name]
    return GPT2Config(vocab_size=VOCAB_SMOKE if SMOKE else 50257, n_positions=1024, n_layer=layers, n_embd=width,
                      n_head=heads, bos_token_id=50256 % (VOCAB_SMOKE if SMOKE else 50257),
                      eos_token_id=50256 % (VOCAB_SMOKE if SMOKE else 50257), dtype=dtype)


def random_model(name: str, dtype: torch.dtype):
    """Random weights at the paper model's shape, built on the device."""
    torch.manual_seed(0)
    with torch.device(DEVICE), quiet_transformers():
        model = AutoModelForCausalLM.from_config(model_config(name, dtype), dtype=dtype)
    return model


def quantize_4bit(model, compute_dtype: torch.dtype):
    """Every linear layer below the LM head as bitsandbytes NF4 with double quantisation: what
    `dpnb.models.load_causal_lm(quantize_4bit=True)` loads, without writing 13 GB of random weights to disk."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child_name != "lm_head":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                          device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
                setattr(parent, child_name, layer.to(DEVICE))  # .to quantises
                del child
    model.is_loaded_in_4bit = True  # what peft reads to put its 4-bit LoRA layers on them
    return model


def random_records(n: int, vocab: int, eos: int) -> Records:
    """n records of exactly TOKENS ids: a 3-token label prompt (not in the loss), random review ids, EOS."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100 % vocab, vocab - 100 % vocab, (n, TOKENS - 1), generator=g)
    return Records([row + [eos] for row in ids.tolist()], [3] * n)


def memory_estimate_gb(name: str, cfg: FinetuneConfig, batch: int) -> float:
    """The arithmetic behind configs/paper.yaml's physical batches (see its comment): fixed + per record."""
    mc = model_config(name, torch.float32)
    if name.startswith("llama"):
        layers, width, heads, vocab = mc.num_hidden_layers, mc.hidden_size, mc.num_attention_heads, mc.vocab_size
        per_layer = 4 * width * width + 3 * width * mc.intermediate_size
        lora = cfg.lora_r * 2 * width * len(cfg.lora_targets) * layers
        fixed = 0.56 * per_layer * layers + 8 * vocab * width + 20 * lora  # NF4 base, fp32 embeddings and head
        per_record = 4 * lora
    else:
        layers, width, heads, vocab = mc.n_layer, mc.n_embd, mc.n_head, mc.vocab_size
        params = 12 * width * width * layers + vocab * width + 1024 * width
        fixed = 20 * params  # fp32 weights, gradient, clipped sum, AdamW's two moments
        per_record = 4 * params  # the fp32 per-sample gradients
    per_record += 34 * width * TOKENS * layers + 5 * heads * TOKENS**2 * layers + 10 * TOKENS * vocab
    return (fixed + batch * per_record) / 1e9


def sharpen(model, factor: float = 8.0) -> None:
    """Scale the final norm's weight so the logits spread like a trained model's (std about 4 instead of
    0.5): random weights give a nearly flat next-token distribution, whose top-p head holds most of the
    vocabulary, the slowest case for any top-p sampler and not what a fine-tuned model gives."""
    inner = unwrap(model)
    norm = inner.transformer.ln_f if hasattr(inner, "transformer") else inner.model.norm
    with torch.no_grad():
        norm.weight.mul_(factor)


def time_sampling(model, cfg_generate, eos: int, rows: int, new_tokens: int, engine: str | None = None) -> dict:
    """Tokens per second of `rows` samples of `new_tokens` new tokens from one 3-token prompt, with the
    generate config's settings (vLLM is not timed here: it needs exported weights and a tokenizer)."""
    engine = engine or ("fast" if is_supported(model) else "hf")
    cfg = dataclasses.replace(cfg_generate, max_new_tokens=new_tokens, batch_size=rows,
                              min_new_tokens=min(cfg_generate.min_new_tokens, new_tokens))
    prompt = [5, 6, 7]
    with engines.open_engine(engine, model, SamplingSettings.from_config(cfg, [eos])) as sampler:
        sync()
        started = time.perf_counter()
        out = sampler.sample([prompt] * rows, 0)
        sync()
        wall = time.perf_counter() - started
    produced = sum(len(tokens) + int(stopped) for tokens, stopped in out)
    return {"engine": engine, "rows": rows, "new_tokens": new_tokens, "tokens": produced, "seconds": wall,
            "tokens_per_s": produced / wall, "stopped": sum(int(s) for _, s in out)}


def measure_training(name: str, run, batch: int) -> dict:
    """Build the model as the paper's run trains it, run a warm-up and a timed logical step at `batch`."""
    cfg = dataclasses.replace(run.finetune, device=DEVICE, deterministic=True, checkpoint_every=10**6,
                              physical_batch_size=batch, logical_batch_size=batch * TIMED_BATCHES, max_steps=None)
    if SMOKE and cfg.dtype == "bfloat16":
        cfg = dataclasses.replace(cfg, dtype="float32")  # no bf16 units on most CPUs
    free()
    if cfg.mode == "qlora":
        base = quantize_4bit(random_model(name, getattr(torch, cfg.dtype)),
                             torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    elif cfg.mode == "full":
        base = random_model(name, getattr(torch, cfg.dtype))
    else:
        raise RuntimeError(f"mode {cfg.mode} is not measured here")
    with quiet_transformers():
        model, notes = build_model(name, cfg, DEVICE, base_model=base)
    del base
    vocab = model.config.vocab_size
    eos = model.config.eos_token_id
    sizes = [batch] + [batch * TIMED_BATCHES]
    records = random_records(sum(sizes), vocab, eos)
    precision_note = dpsgd.compute_precision(cfg, DEVICE).reason
    session = fixed_session(model, cfg, sizes, sigma=1.0)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    walls = run_steps(session, records, cfg, eos, 2)
    timed_records = batch * TIMED_BATCHES
    out = {"physical_batch": batch, "mode": cfg.mode, "grad_sample_mode": cfg.grad_sample_mode,
           "precision": precision_note, "dtype": cfg.dtype, "trainable": trainable_parameters(model),
           "warmup_s": walls[0], "timed_s": walls[1], "timed_records": timed_records,
           "s_per_record": walls[1] / timed_records, "peak_gb": peak_gb(),
           "estimate_gb": memory_estimate_gb(name, cfg, batch), "notes": notes}
    out["finetune_h"] = out["s_per_record"] * N_TRAIN * EPOCHS / 3600
    if cfg.mode == "qlora":  # sample the tuned model as the generate stage would (4-bit base + LoRA)
        session.model.remove_hooks()
        out["_model"] = model
    del session
    return out


for name in wanted:
    run = runs[name]
    entry: dict = {"configured_batch": run.finetune.physical_batch_size}
    RESULT["models"][name] = entry
    if run.finetune.mode == "qlora" and not HAVE_BNB:
        entry["skipped"] = BNB_WHY
        say(f"  {name}: skipped ({BNB_WHY})")
        continue
    if left() < (20 if SMOKE else 100 if run.finetune.mode == "qlora" else 45):  # what one model takes at most
        entry["skipped"] = f"out of time ({left():.0f} s of the budget left)"
        say(f"  {name}: skipped, {entry['skipped']}")
        continue
    gen = run.generate
    rows = min(gen.batch_size, 4) if SMOKE else gen.batch_size
    new_tokens = 8 if SMOKE else (100 if run.finetune.mode == "qlora" else NEW_TOKENS)
    sample_rows: list[dict] = []
    if run.finetune.mode == "qlora":  # the zero-shot base in bf16 (the synthetic set comes from 4-bit + LoRA)
        base = random_model(name, torch.float32 if SMOKE else torch.bfloat16).eval()
        sharpen(base)
        s = time_sampling(base, gen, base.config.eos_token_id, rows, new_tokens)
        s["what"] = "zero-shot base, bf16"
        sample_rows.append(s)
        del base
        free()
    batch = min(run.finetune.physical_batch_size, 2) if SMOKE else run.finetune.physical_batch_size
    oom: list[int] = []
    measured = None
    while measured is None:
        try:
            measured = measure_training(name, run, batch)
        except torch.cuda.OutOfMemoryError:
            oom.append(batch)
        if measured is None:
            free()  # outside the handler, whose traceback kept the failed attempt's tensors alive
            if batch == 1:
                break
            batch //= 2
            say(f"  {name}: physical batch {oom[-1]} ran out of memory; trying {batch}")
    entry["oom_batches"] = oom
    if measured is None:
        entry["skipped"] = "even a physical batch of 1 ran out of memory"
        continue
    tuned = measured.pop("_model", None)
    entry.update(measured)
    say(f"  {name:12} {entry['mode']} {entry['grad_sample_mode']} B={batch}: {1000 * entry['s_per_record']:.1f} "
        f"ms/record, peak {entry['peak_gb'] or 0:.1f} GB (estimate {entry['estimate_gb']:.1f}), "
        f"{entry['precision']}; fine-tune {entry['finetune_h']:.2f} h")
    free()
    try:
        if tuned is not None:
            sharpen(tuned)
            s = time_sampling(tuned.eval(), gen, tuned.config.eos_token_id, rows, new_tokens)
            s["what"] = "tuned model, 4-bit base + LoRA"
            sample_rows.append(s)
            del tuned
        else:
            model = random_model(name, torch.float32 if SMOKE else torch.bfloat16).eval()
            sharpen(model)
            s = time_sampling(model, gen, model.config.eos_token_id, rows, new_tokens)
            s["what"] = "bf16 (tuned and zero-shot alike)"
            sample_rows.append(s)
            if name == "gpt2":
                hf = time_sampling(model, gen, model.config.eos_token_id, rows, new_tokens, engine="hf")
                hf["what"] = "HF generate, same settings"
                entry["sampling_hf"] = hf
                entry["fast_over_hf"] = s["tokens_per_s"] / hf["tokens_per_s"]
            del model
    except Exception as exc:  # noqa: BLE001
        entry["sampling_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        say(f"  {name}: sampling ERROR {entry['sampling_error']}")
    free()
    entry["sampling"] = sample_rows
    if sample_rows:
        half = N_SAMPLES // 2  # synthetic from the tuned model, zero-shot from the base
        rate_tuned = sample_rows[-1]["tokens_per_s"]
        rate_base = sample_rows[0]["tokens_per_s"]
        entry["sample_h"] = (half * NEW_TOKENS / rate_tuned + half * NEW_TOKENS / rate_base) / 3600
        for s in sample_rows:
            say(f"  {name:12} sampling {s['what']}: {s['engine']}, {s['rows']} rows x {s['new_tokens']} tokens, "
                f"{s['tokens_per_s']:.0f} tokens/s ({s['stopped']} rows stopped early)")
        if "fast_over_hf" in entry:
            say(f"  {name:12} HF generate: {entry['sampling_hf']['tokens_per_s']:.0f} tokens/s; fast / HF = "
                f"{entry['fast_over_hf']:.2f}x")

# =========================================================================== d. DistilBERT

say("d. DistilBERT: one training step and one prediction batch at 64 x 300 tokens (float32, as dpnb runs it)")
RESULT["distilbert"] = {}
evaluate = next(iter(runs.values())).evaluate
try:
    if left() < 10:
        raise RuntimeError(f"out of time ({left():.0f} s left)")
    config = (DistilBertConfig(vocab_size=VOCAB_SMOKE, dim=32, hidden_dim=64, n_layers=2, n_heads=2, num_labels=2)
              if SMOKE else DistilBertConfig(num_labels=2))
    batch_size = 4 if SMOKE else evaluate.batch_size
    length = 32 if SMOKE else evaluate.max_length
    torch.manual_seed(0)
    with torch.device(DEVICE), quiet_transformers():
        classifier = AutoModelForSequenceClassification.from_config(config).train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=evaluate.lr, weight_decay=0.0)
    ids = torch.randint(1000 % config.vocab_size, config.vocab_size, (batch_size, length), device=DEVICE)
    labels = torch.randint(0, 2, (batch_size,), device=DEVICE)
    mask = torch.ones_like(ids)
    walls = []
    for _ in range(4):  # the first is a warm-up
        sync()
        started = time.perf_counter()
        loss = classifier(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        walls.append(time.perf_counter() - started)
    classifier.eval()
    predicts = []
    with torch.inference_mode():
        for _ in range(3):
            sync()
            started = time.perf_counter()
            classifier(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
            sync()
            predicts.append(time.perf_counter() - started)
    step_s, predict_s = min(walls[1:]), min(predicts[1:])
    steps = math.ceil(evaluate.epochs * math.ceil(N_TRAIN / 64))
    per_classifier_s = steps * step_s + math.ceil(N_TEST / 64) * predict_s
    RESULT["distilbert"] = {"step_s": step_s, "predict_s": predict_s, "batch": batch_size, "tokens": length,
                            "steps": steps, "per_classifier_h": per_classifier_s / 3600}
    say(f"  step {1000 * step_s:.1f} ms, prediction batch {1000 * predict_s:.1f} ms; one classifier "
        f"({steps} steps + {N_TEST:,} predictions) {per_classifier_s / 60:.1f} min")
    del classifier, optimizer
except Exception as exc:  # noqa: BLE001
    RESULT["distilbert"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    say(f"  DistilBERT ERROR {RESULT['distilbert']['error']}")
free()

# =========================================================================== e. the table

per_classifier_h = RESULT["distilbert"].get("per_classifier_h")
table = []
for name in runs:
    entry = RESULT["models"].get(name, {"skipped": "not measured (--models)"})
    classifiers = 3 if name == next(iter(runs)) else 2  # the sweep's first run trains the real one too
    finetune_h, sample_h = entry.get("finetune_h"), entry.get("sample_h")
    evaluate_h = classifiers * per_classifier_h if per_classifier_h is not None else None
    parts = [finetune_h, sample_h, evaluate_h]
    total_h = sum(parts) if all(p is not None for p in parts) else None
    table.append({"model": name, "physical_batch": entry.get("physical_batch"), "finetune_h": finetune_h,
                  "sample_h": sample_h, "evaluate_h": evaluate_h, "classifiers": classifiers, "total_h": total_h,
                  "skipped": entry.get("skipped")})
RESULT["table"] = table
complete = all(row["total_h"] is not None for row in table)
RESULT["sweep_h"] = sum(row["total_h"] for row in table if row["total_h"] is not None)
gpt2_row = next((row for row in table if row["model"] == "gpt2"), None)
gpt2_min = gpt2_row["total_h"] * 60 if gpt2_row and gpt2_row["total_h"] is not None else None
RESULT["targets"] = {
    "gpt2_run_under_15_min": None if gpt2_min is None else gpt2_min < 15,
    "gpt2_run_min": gpt2_min,
    "sweep_under_4_h": RESULT["sweep_h"] < 4 if complete else None,
    "sweep_complete": complete,
}
RESULT["clipping_ok"] = all(row.get("ok", True) for row in RESULT["clipping"]) and all(
    row["ok"] for row in RESULT["greedy"])


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


print()
print(f"Paper wall time, extrapolated (h) - {RESULT['date']} - GPU: {GPU} - torch {torch.__version__}"
      + ("  [SMOKE RUN ON THE CPU: tiny shapes, meaningless figures]" if SMOKE else ""))
print(f"{'model':12} | {'B':>4} | {'fine-tune h':>11} | {'sample h':>8} | {'evaluate h':>10} | {'total h':>7}")
print("-" * 68)
for row in table:
    print(f"{row['model']:12} | {row['physical_batch'] or '-':>4} | {fmt(row['finetune_h']):>11} | "
          f"{fmt(row['sample_h']):>8} | {fmt(row['evaluate_h']):>10} | {fmt(row['total_h']):>7}"
          + (f"   skipped: {row['skipped']}" if row["skipped"] else ""))
print("-" * 68)
print(f"{'sweep':12} | {'':>4} | {'':>11} | {'':>8} | {'':>10} | {RESULT['sweep_h']:7.2f}"
      + ("" if complete else "   (incomplete: some models skipped)"))
verdict = {True: "PASS", False: "FAIL", None: "n/a"}
print(f"target: the gpt2 run under 15 min: {verdict[RESULT['targets']['gpt2_run_under_15_min']]}"
      + (f" ({gpt2_min:.1f} min)" if gpt2_min is not None else ""))
print(f"target: the five-model sweep under 4 h: {verdict[RESULT['targets']['sweep_under_4_h']]}"
      + (f" ({RESULT['sweep_h']:.2f} h)" if complete else ""))
print(f"clipping and greedy checks: {'PASS' if RESULT['clipping_ok'] else 'FAIL'}")
print("fine-tune: 25,000 x 5 epochs records of 300 tokens at the measured s/record; sample: 2 x 25,000 x 300 new "
      "tokens at the measured rate (upper bound: every sample runs to 300); evaluate: DistilBERT training and "
      "test prediction only (no MAUVE, no memorisation screen, no prepare)")
RESULT["wall_s"] = elapsed()
say(f"done in {RESULT['wall_s']:.0f} s")
with contextlib.suppress(Exception):
    import shutil

    shutil.rmtree(saved_llama, ignore_errors=True)
if args.json:
    print(json.dumps(RESULT, default=str))
sys.exit(0 if RESULT["clipping_ok"] else 1)
