"""One typed config per stage, built from plain dicts with unknown keys refused.

Each stage of the pipeline (`dpnb.registry.STAGES`) has one config class here; the run config that
holds them all, read from YAML, is `dpnb.runconfig.RunConfig`. `build(cls, values)` makes a config
from the plain values of YAML or papermill. Unknown keys are errors that name the key and list the
valid ones: a typo in a privacy parameter must never fall back silently to a default. Each config
validates its own values when built, so a bad parameter fails before any data is read or any model
is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dpnb.errors import DpnbError, require

T = TypeVar("T")


def build(cls: type[T], values: dict[str, Any] | None, where: str | None = None) -> T:
    """Build config `cls` from a plain dict, refusing unknown keys with a message that names them."""
    values = dict(values or {})
    where = where or cls.__name__
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise DpnbError(
            f"unknown key(s) {', '.join(unknown)} in {where}; valid keys are: {', '.join(sorted(known))}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Accept YAML's spelling of a value where it is unambiguous (1e-2 as a string, lists as tuples).

    Nothing is guessed: a value of the wrong kind is an error naming the key and the expected type.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if hint is type(None) or type(None) in args or hint is Any:
            return None
        raise DpnbError(f"{where} must not be empty (null); give a value of type {_name(hint)}")
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except DpnbError:
                continue
        raise DpnbError(f"{where} = {value!r} is not a {_name(hint)}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise DpnbError(f"{where} = {value!r} must be true or false")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML reads "1e-2" (no dot) as a string
            except ValueError:
                pass
        if number is None:
            raise DpnbError(f"{where} = {value!r} must be a number")
        # no setting means anything at NaN or infinity (.nan, .inf in YAML): refused for every float at once
        require(math.isfinite(number), f"{where} = {value!r} must be a finite number; give a value without NaN or "
                                       f"infinity (.nan, .inf)")
        return number
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DpnbError(f"{where} = {value!r} must be a whole number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise DpnbError(f"{where} = {value!r} must be a string")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise DpnbError(f"{where} = {value!r} must be a list")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise DpnbError(f"{where} = {value!r} must be a mapping")
        return dict(value)
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _one_of(value: Any, allowed: tuple[Any, ...], where: str) -> None:
    require(value in allowed, f"{where} = {value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(value: float | int | None, where: str) -> None:
    if value is not None:
        require(value > 0 and math.isfinite(value), f"{where} must be a positive number, got {value!r}")


# --------------------------------------------------------------------------- stage configs


@dataclass
class PrepareConfig:
    """01 prepare: labelled text in, training-ready records out."""

    # Hub id (the default reads $DPNB_DATA_DIR's mirror when set); a directory holding train.csv and
    # test.csv (or .tsv/.jsonl/.parquet, .gz too) or aclImdb's train/pos/*.txt folders; or "TRAIN,TEST" files
    source: str = "stanfordnlp/imdb"
    model: str = "smollm2-135m"  # whose tokenizer cuts and counts tokens (the generator)
    train_split: str = "train"
    test_split: str = "test"
    text_column: str = "text"
    label_column: str = "label"
    label_names: tuple[str, ...] = ("negative", "positive")  # label value i is called label_names[i]
    n_train: int | None = None  # stratified subsample size; None keeps the whole split
    n_test: int | None = None
    seed: int = 0
    prompt_format: str = "plain"  # "plain": label + delimiter + review (the paper); "chat": chat template
    delimiter: str = " | "
    chat_instruction: str = "Write a {label} movie review."
    strip_html: bool = True
    max_length: int = 300  # tokens, EOS included
    max_dropped_fraction: float = 0.01  # null/empty texts dropped and counted; more than this is an error

    def __post_init__(self) -> None:
        _one_of(self.prompt_format, ("plain", "chat"), "prepare.prompt_format")
        require(self.source.strip() != "", "prepare.source is empty; give a Hub data set id, a directory or files")
        require(len(self.label_names) >= 2, "prepare.label_names needs at least two labels")
        require(len(set(self.label_names)) == len(self.label_names), "prepare.label_names has duplicates")
        require(self.max_length >= 8, f"prepare.max_length = {self.max_length} is too short (>= 8 tokens)")
        _positive(self.n_train, "prepare.n_train")
        _positive(self.n_test, "prepare.n_test")
        require(0 <= self.max_dropped_fraction < 1, "prepare.max_dropped_fraction must be in [0, 1)")
        if self.prompt_format == "chat":
            require("{label}" in self.chat_instruction, "prepare.chat_instruction must contain {label}")


@dataclass
class FinetuneConfig:
    """02 finetune: DP-SGD on a pre-trained causal LM. Defaults are the paper's settings."""

    mode: str = "full"  # "full" (every weight), "lora" (peft adapters), "qlora" (4-bit base + LoRA)
    dp: bool = True  # False: the same loop with no clipping or noise (the epsilon = infinity baseline)
    target_epsilon: float = 8.0
    delta: float | None = None  # None: 1 / N^1.1, below the 1/N that would allow leaking one record
    accountant: str = "prv"  # the accountant that calibrates noise and reports epsilon ("prv" or "rdp")
    epochs: float = 5.0
    max_steps: int | None = None  # stop after this many logical steps (noise is calibrated for them)
    logical_batch_size: int = 1028  # expected records per noise-adding step (Poisson sampling)
    physical_batch_size: int = 8  # records per forward/backward pass (memory); BatchMemoryManager splits
    max_grad_norm: float = 1e-2  # per-example clipping norm C
    lr: float = 5.1e-4
    lr_schedule: str = "constant"  # "constant", or "linear" decay to 0 at the last planned step
    weight_decay: float = 0.0
    loss_on_prompt: bool = False  # False: learn the review given its label prompt, not the prompt itself
    grad_sample_mode: str = "hooks"  # "hooks" or "ghost" (ghost clipping: less memory, unties embeddings)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_top_layers: int | None = None  # put adapters only on the top N transformer blocks
    top_layers: int | None = None  # mode full: train only the top N blocks and the final norm (embeddings frozen)
    # When only the top blocks train (lora_top_layers, top_layers), the blocks below are run once per record
    # and their outputs kept in memory (dpnb.training.prefix_cache): the same gradients, several times faster per step.
    prefix_cache: bool = True
    dtype: str = "float32"  # the trainable model's: "float32", or "bfloat16" without DP (under DP see precision)
    # "bf16-mixed": the forward and backward run under bf16 autocast while the weights, the per-sample
    # gradients, their norms, the clipping, the noise and AdamW stay float32 (dpnb.training.dpsgd.compute_precision).
    # "auto": bf16-mixed where a bf16 matmul is measured at least 2x float32 on this device (dpnb.precision:
    # CUDA with bf16, a CPU with AVX512-BF16 or AMX), float32 elsewhere (a CPU without bf16 units runs a bf16
    # matmul at well under 1 GFLOP/s). Either way, on CUDA TF32 for the float32 matmuls of the forward
    # and backward pass, never inside the clipping (nor with ghost clipping, which clips in the backward pass).
    precision: str = "auto"
    device: str = "auto"  # "auto", "cpu", "cuda"
    checkpoint_every: int = 50  # logical steps between resumable checkpoints (also on SIGINT/SIGTERM)
    samples_before_after: int = 2  # seeded samples per label the notebook shows before and after training
    seed: int = 0  # data order of step 0's loss, adapter initialisation; NOT the DP noise (see deterministic)
    # False (the default, a DP release): the noise and the Poisson sampling draw from OS entropy, so nobody
    # holding the config can regenerate them. True: both are drawn from the seed, for tests and teaching;
    # privacy.json and the cards then say the run is not a DP release.
    deterministic: bool = False

    def __post_init__(self) -> None:
        _one_of(self.mode, ("full", "lora", "qlora"), "finetune.mode")
        _one_of(self.accountant, ("prv", "rdp"), "finetune.accountant")
        _one_of(self.grad_sample_mode, ("hooks", "ghost"), "finetune.grad_sample_mode")
        _one_of(self.dtype, ("float32", "bfloat16"), "finetune.dtype")
        _one_of(self.precision, ("auto", "fp32", "bf16-mixed"), "finetune.precision")
        # bf16 weights would make Opacus take the per-record norms, the clipping, the clipped sum and the noise
        # in bf16: a norm rounded down lets a record move the update by more than C (every mode, hooks or ghost)
        require(not (self.dp and self.dtype == "bfloat16"),
                "finetune.dtype bfloat16 with dp: true would clip and noise the gradients in bf16, where a record "
                "can exceed the clipping bound; use dtype float32 with precision: bf16-mixed (float32 weights, "
                "bf16 autocast)")
        require(not (self.precision == "bf16-mixed" and self.dtype == "bfloat16"),
                "finetune.precision bf16-mixed keeps float32 weights; it needs finetune.dtype float32")
        require(not (self.precision == "bf16-mixed" and self.grad_sample_mode == "ghost"),
                "finetune.precision bf16-mixed with ghost clipping would take the per-sample norms in bf16 "
                "(Opacus computes them from bf16 activations), and a norm rounded down lets a record "
                "exceed the clipping bound: use grad_sample_mode hooks, or precision fp32")
        _one_of(self.device, ("auto", "cpu", "cuda"), "finetune.device")
        _one_of(self.lr_schedule, ("constant", "linear"), "finetune.lr_schedule")
        require(
            self.target_epsilon > 0 and math.isfinite(self.target_epsilon),
            f"finetune.target_epsilon must be a positive number, got {self.target_epsilon!r}; give the privacy "
            f"budget to train to, e.g. 8 (smaller is more private)",
        )
        if self.delta is not None:
            require(0 < self.delta < 1, f"finetune.delta must be in (0, 1), got {self.delta!r}")
        for name in ("epochs", "logical_batch_size", "physical_batch_size", "max_grad_norm", "lr"):
            _positive(getattr(self, name), f"finetune.{name}")
        _positive(self.max_steps, "finetune.max_steps")
        _positive(self.checkpoint_every, "finetune.checkpoint_every")
        require(
            self.physical_batch_size <= self.logical_batch_size,
            f"finetune.physical_batch_size ({self.physical_batch_size}) is larger than "
            f"logical_batch_size ({self.logical_batch_size}); make it smaller or equal",
        )
        require(self.weight_decay >= 0, f"finetune.weight_decay must be >= 0, got {self.weight_decay!r}")
        require(self.samples_before_after >= 0, "finetune.samples_before_after must be >= 0")
        _positive(self.top_layers, "finetune.top_layers")
        require(self.top_layers is None or self.mode == "full",
                f"finetune.top_layers restricts mode full to the top blocks; with mode {self.mode} use lora_top_layers")
        if self.mode in ("lora", "qlora"):
            _positive(self.lora_r, "finetune.lora_r")
            _positive(self.lora_alpha, "finetune.lora_alpha")
            _positive(self.lora_top_layers, "finetune.lora_top_layers")
            require(0 <= self.lora_dropout < 1, f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
            require(len(self.lora_targets) > 0, "finetune.lora_targets must name at least one module")
            # The output head shares its weight with the input embedding in SmolLM2, GPT-2 and the tiny
            # models: merging an adapter on it would change the embedding too (a silently wrong model).
            tied = sorted(set(self.lora_targets) & {"lm_head", "embed_tokens", "wte", "wpe"})
            require(not tied, f"finetune.lora_targets {tied} would put adapters on tied embedding weights, which "
                              f"merging corrupts; target attention or MLP projections (e.g. q_proj, v_proj)")


@dataclass
class GenerateConfig:
    """03 generate: label-prompted sampling from the fine-tuned model (and the base model).

    The number of samples per label is a setting, never read from the private data: matching the
    private label counts would release them without any noise, outside the DP guarantee.
    """

    n_per_label: int = 12500  # paper: 25,000 in all, balanced
    temperature: float = 1.0
    top_p: float = 0.95  # 1 disables nucleus sampling
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 300
    min_new_tokens: int = 0  # EOS is masked out before this many new tokens
    batch_size: int = 32  # sequences sampled together; the samples depend on it (random stream per batch)
    shard_size: int = 256  # samples per shard file; a rerun resumes after the last complete shard
    zero_shot: bool = True  # also sample the base model with the same prompts (no fine-tuning)
    min_words: int = 3  # post-processing: shorter samples are dropped as degenerate
    max_repeat_fraction: float = 0.5  # drop samples whose most frequent token is more than this share
    dtype: str = "auto"  # "float32", "bfloat16", or "auto": bfloat16 where measured >= 2x float32 (dpnb.precision)
    device: str = "auto"
    # "fast": dpnb.generation.decoding (static KV cache, finished rows refilled, exact top-p without a full sort);
    # "hf": transformers' generate; "vllm": vLLM (optional, `pip install dpnb[vllm]`, for a GPU);
    # "auto": vllm on a GPU when installed, else fast for the architectures it supports, else hf.
    # All draw from the same distribution; the samples themselves differ.
    engine: str = "auto"
    seed: int = 0
    # Private Evolution (dpnb.generation.evolution): a second DP generator that never trains the model. A pool of
    # pe_pool_factor x n_per_label samples per label from the start model (the zero-shot set, or the DP
    # fine-tuned set, plus more of the same) is voted on by the private records; the n_per_label of each
    # label with the most noisy votes form the set (with pe_iterations > 1, variations of the kept
    # samples are voted on again first). pe_epsilon is the set's TOTAL budget: with pe_start "finetuned"
    # it includes the fine-tuning's epsilon (composed, one accountant), and with pe_relabel_epsilon a DP
    # classifier (dpnb.evaluation.dp_classifier, that share of the budget) labels the pool before the votes.
    pe: bool = False
    pe_start: str = "base"  # "base": the base model's zero-shot samples; "finetuned": the DP fine-tuned model's
    pe_pool_factor: int = 2
    pe_iterations: int = 1
    pe_epsilon: float | None = 8.0  # None: exact votes (no DP; the non-private reference of a sweep)
    pe_relabel_epsilon: float | None = None
    pe_nearest: int = 4  # each private record's votes go to its k nearest samples (1/sqrt(k) each)
    pe_keep_fraction: float = 0.5  # between iterations: the share of each label kept and varied
    pe_opening_fraction: float = 0.3  # a variation continues the kept sample's first words (this share)
    pe_encoder: str = "minilm-l6"

    def __post_init__(self) -> None:
        _one_of(self.engine, ("auto", "fast", "hf", "vllm"), "generate.engine")
        _one_of(self.pe_start, ("base", "finetuned"), "generate.pe_start")
        for name in ("pe_pool_factor", "pe_iterations", "pe_nearest", "pe_epsilon", "pe_relabel_epsilon"):
            _positive(getattr(self, name), f"generate.{name}")
        require(0 < self.pe_keep_fraction < 1, "generate.pe_keep_fraction must be in (0, 1)")
        require(0 < self.pe_opening_fraction < 1, "generate.pe_opening_fraction must be in (0, 1)")
        require(not (self.pe and self.pe_start == "base" and not self.zero_shot),
                "generate.pe_start base starts from the zero-shot set: set generate.zero_shot true, or pe_start "
                "finetuned")
        if self.pe_relabel_epsilon is not None and self.pe_epsilon is not None:
            require(self.pe_relabel_epsilon < self.pe_epsilon,
                    f"generate.pe_relabel_epsilon ({self.pe_relabel_epsilon:g}) is a share of pe_epsilon "
                    f"({self.pe_epsilon:g}): make it smaller")
        for name in ("n_per_label", "temperature", "max_new_tokens", "batch_size", "shard_size"):
            _positive(getattr(self, name), f"generate.{name}")
        require(0 < self.top_p <= 1, f"generate.top_p must be in (0, 1], got {self.top_p!r}")
        require(self.top_k >= 0, "generate.top_k must be >= 0 (0 disables top-k)")
        require(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"generate.min_new_tokens = {self.min_new_tokens} must be between 0 and max_new_tokens "
            f"({self.max_new_tokens})",
        )
        require(self.min_words >= 0, "generate.min_words must be >= 0 (0 keeps every non-empty sample)")
        require(0 < self.max_repeat_fraction <= 1, "generate.max_repeat_fraction must be in (0, 1]")
        _one_of(self.dtype, ("auto", "float32", "bfloat16"), "generate.dtype")
        _one_of(self.device, ("auto", "cpu", "cuda"), "generate.device")


@dataclass
class EvaluateConfig:
    """04 evaluate: train a classifier on real and on synthetic data, test on the same real data."""

    classifier: str = "minilm-l6"  # paper: distilbert-base-uncased
    # "finetune": fine-tune `classifier` with a fresh head (the paper's recipe: epochs, lr, batch_size);
    # "embedding": logistic regression on its frozen mean-pooled sentence embeddings, C chosen by
    # cross-validation on the training texts (seconds; suits a few hundred texts; epochs and lr unused)
    classifier_kind: str = "finetune"
    epochs: float = 2.0
    lr: float = 2.1e-5
    batch_size: int = 64
    max_length: int = 128  # classifier tokens
    n_real_train: int | None = None  # real training texts for the reference classifier (None: all prepared)
    # training sets to compare: "real" and "dp_classifier" need only prepare; "synthetic" (DP fine-tuned)
    # a completed generate stage; "pe" (Private Evolution) and "zero_shot" are skipped with a note when
    # generate made none
    sources: tuple[str, ...] = ("real", "dp_classifier", "synthetic", "pe", "zero_shot")
    memorisation_threshold: int = 50  # generator tokens shared verbatim with a training text that flag a sample
    # MAUVE of each source's texts against the real test texts, on MiniLM embeddings (cut to max_length)
    mauve: bool = True
    mauve_max_texts: int = 1000  # texts per side at most (a seeded random subsample); noisy below a few hundred
    # The direct DP classifier (dpnb.evaluation.dp_classifier): logistic regression on the frozen embeddings of
    # `classifier`, trained with DP-SGD on every prepared training record, at the fine-tuning run's
    # (epsilon, delta) unless set here (8 and 1/N^1.1 when the run fine-tuned without DP). The recipe
    # was chosen on a validation split of IMDb training reviews.
    dp_classifier_epsilon: float | None = None
    dp_classifier_delta: float | None = None
    dp_classifier_epochs: float = 30.0
    dp_classifier_batch_size: int = 256
    dp_classifier_lr: float = 0.05
    dp_classifier_max_grad_norm: float = 1.0
    # the sentence encoder's format: "auto" is bfloat16 where measured at least 2x float32 (dpnb.precision)
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0  # classifier training, MAUVE's subsamples and clustering

    def __post_init__(self) -> None:
        for name in ("epochs", "lr", "batch_size", "max_length", "memorisation_threshold", "mauve_max_texts",
                     "dp_classifier_epochs", "dp_classifier_batch_size", "dp_classifier_lr",
                     "dp_classifier_max_grad_norm"):
            _positive(getattr(self, name), f"evaluate.{name}")
        _one_of(self.classifier_kind, ("finetune", "embedding"), "evaluate.classifier_kind")
        require(self.mauve_max_texts >= 2, "evaluate.mauve_max_texts must be at least 2 (MAUVE needs 2 texts per side)")
        _positive(self.n_real_train, "evaluate.n_real_train")
        _positive(self.dp_classifier_epsilon, "evaluate.dp_classifier_epsilon")
        if self.dp_classifier_delta is not None:
            require(0 < self.dp_classifier_delta < 1,
                    f"evaluate.dp_classifier_delta must be in (0, 1), got {self.dp_classifier_delta!r}")
        require(len(self.sources) > 0, "evaluate.sources is empty; list at least one of " + ", ".join(SOURCE_NAMES))
        require(len(set(self.sources)) == len(self.sources), "evaluate.sources has duplicates; list each once")
        for source in self.sources:
            _one_of(source, SOURCE_NAMES, "evaluate.sources[]")
        _one_of(self.dtype, ("auto", "float32", "bfloat16"), "evaluate.dtype")
        _one_of(self.device, ("auto", "cpu", "cuda"), "evaluate.device")


# what a classifier can be trained on, in the order of the evaluation's table
SOURCE_NAMES = ("real", "dp_classifier", "synthetic", "pe", "zero_shot")


@dataclass
class AuditConfig:
    """06 audit: canaries, a one-run epsilon lower bound, membership inference.

    The stage trains two twins with the run's fine-tuning config (DP as configured, and the same
    without DP) on the training set plus the inserted canaries, then attacks both.
    """

    n_canaries: int = 1000  # each is inserted with probability 1/2 (an independent fair coin)
    # times each inserted canary appears in the training set; 1 tests the per-record claim, >1 only the
    # group claim (k eps, k e^((k-1) eps) delta), whose delta often reaches 1: a vacuous audit
    canary_repeats: int = 1
    canary_prefix_tokens: int = 24  # in-distribution start: this many tokens of a held-out review
    canary_suffix_tokens: int = 12  # random high-perplexity suffix: this many random whole-word tokens
    n_reference: int = 1000  # never-inserted canaries drawn the same way, for exposure ranks
    score: str = "calibrated"  # "calibrated": base loss - fine-tuned loss on the suffix; "loss": -loss
    n_guesses: int | None = None  # one-run audit guesses; None tries 10/20/50/100% (Bonferroni-corrected)
    confidence: float = 0.95  # of the one-run epsilon lower bound
    n_mia: int = 500  # training members and as many held-out non-members for the loss attack
    synthetic_per_label: int = 100  # samples per label from each twin for the synthetic-data attack; 0 skips
    synthetic_max_new_tokens: int = 64
    ngram_order: int = 3  # synthetic-data-only attack: n-gram model over the released text
    ngram_smoothing: float = 0.01  # add-k smoothing of the n-gram model
    finetune_overrides: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields for both twins
    batch_size: int = 16  # sequences per forward pass when scoring
    device: str = "auto"  # scoring and sampling device ("auto", "cpu", "cuda")
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_canaries", "canary_repeats", "canary_prefix_tokens", "canary_suffix_tokens",
                     "n_reference", "n_mia", "synthetic_max_new_tokens", "ngram_order", "ngram_smoothing",
                     "batch_size"):
            _positive(getattr(self, name), f"audit.{name}")
        require(self.n_canaries >= 2, "audit.n_canaries must be at least 2 (some in, some out)")
        if self.n_guesses is not None:
            require(
                2 <= self.n_guesses <= self.n_canaries,
                f"audit.n_guesses = {self.n_guesses} must be between 2 and n_canaries ({self.n_canaries}), "
                f"or null to try several",
            )
        require(0.5 < self.confidence < 1, "audit.confidence must be in (0.5, 1)")
        require(self.synthetic_per_label >= 0, "audit.synthetic_per_label must be >= 0 (0 skips that attack)")
        _one_of(self.score, ("calibrated", "loss"), "audit.score")
        _one_of(self.device, ("auto", "cpu", "cuda"), "audit.device")
        known = {f.name for f in dataclasses.fields(FinetuneConfig)}
        unknown = sorted(set(self.finetune_overrides) - known)
        require(not unknown, f"audit.finetune_overrides has unknown key(s) {', '.join(unknown)}; "
                             f"valid keys are FinetuneConfig fields: {', '.join(sorted(known))}")
        require("dp" not in self.finetune_overrides,
                "audit.finetune_overrides must not set dp: the audit trains one twin with DP and one without")
        require(self.finetune_overrides.get("dtype") != "bfloat16",
                "audit.finetune_overrides dtype bfloat16 would clip and noise the DP twin's gradients in bf16; use "
                "dtype float32 with precision: bf16-mixed (float32 weights, bf16 autocast)")
