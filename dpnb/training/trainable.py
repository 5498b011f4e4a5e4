"""The model DP-SGD trains: exactly the weights of the fine-tuning mode trainable, and its card.

Fine-tuning modes, each over the one base loader (`dpnb.models.load_base_model`):

- `full`: every weight trains (the LM head is untied from the input embedding first when ghost
  clipping needs it), or, with `top_layers`, only the top blocks and the final norm (the frozen
  blocks below are then computed once per record: `dpnb.training.frozen_prefix`);
- `lora`: peft adapters on a frozen base (optionally on the top `lora_top_layers` only);
- `qlora`: LoRA adapters on a base loaded in 4-bit NF4, kept differentiable on a CPU
  (`keep_4bit_weights_differentiable`).

`model_card` is what `dpnb.models.load_trained` rebuilds the trained model from (dpnb_model.json).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from dpnb.errors import require
from dpnb.models import load_base_model, peft_module, quiet_transformers
from dpnb.training.prefix_cache import model_parts

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

    from dpnb.config import FinetuneConfig


def embeddings_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def untie_embeddings(model: PreTrainedModel) -> int:
    """Give the LM head its own copy of the input embedding (ghost clipping refuses shared weights).

    Returns the number of parameters this adds.
    """
    embedding = model.get_input_embeddings().weight
    model.get_output_embeddings().weight = torch.nn.Parameter(embedding.detach().clone())
    model.config.tie_word_embeddings = False
    return embedding.numel()


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of a model's linear layers (what LoRA can target)."""
    kinds = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if type(module).__name__ in kinds and name})


def lora_config(cfg: FinetuneConfig, model: PreTrainedModel) -> Any:
    """The peft LoraConfig of `cfg`, checked against the model's module names and depth."""
    available = linear_module_names(model)
    missing = [t for t in cfg.lora_targets if t not in available]
    require(not missing,
            f"finetune.lora_targets {missing} are not modules of {type(model).__name__}; its linear layers "
            f"are: {', '.join(available)} (GPT-2: c_attn, c_proj, c_fc; Llama: q_proj, k_proj, v_proj, o_proj)")
    layers = None
    if cfg.lora_top_layers is not None:
        depth = int(model.config.num_hidden_layers)
        require(cfg.lora_top_layers <= depth,
                f"finetune.lora_top_layers = {cfg.lora_top_layers} but the model has {depth} layers; "
                f"give at most {depth}")
        layers = list(range(depth - cfg.lora_top_layers, depth))
    # GPT-2's Conv1D layers store their weight transposed; peft must be told
    conv1d = any(type(module).__name__ == "Conv1D" and name.rsplit(".", 1)[-1] in cfg.lora_targets
                 for name, module in model.named_modules())
    return peft_module().LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.lora_targets), layers_to_transform=layers,
                              fan_in_fan_out=conv1d, task_type="CAUSAL_LM")


def is_quantized_4bit(model: nn.Module) -> bool:
    return any(type(module).__name__ == "Linear4bit" for module in model.modules())


def _cpu_packed(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_4bit_weights_differentiable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking the frozen 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, a bitsandbytes `Linear4bit` run in eval mode on an input that does not
    require grad (the step-0 loss under `no_grad`, any evaluation) rewrites its weight, in place and
    for good, into a CPU inference layout (absmax cast to bfloat16). From then on every forward goes
    through `gemv_4bit`, an op with no autograd formula: back-propagation through the layer yields no
    gradient for its input. The adapters reach the loss only through frozen 4-bit layers (q_proj and
    v_proj only through o_proj), so their gradients vanish: Opacus's backward hook of a lora_B then
    receives None, and without DP the adapters would silently get no update. The repacking also
    changes the weights (bfloat16 absmax), so the base trained against would no longer be the one
    `load_base_model` rebuilds.
    """
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "support_avx512bf16_for_cpu")}
    packed = [name for name, m in layers.items() if _cpu_packed(m)]
    require(not packed,
            f"the 4-bit base was already run for CPU inference ({', '.join(packed[:2])} repacked, which "
            f"loses gradients and changes its weights); pass a freshly loaded base")
    for module in layers.values():
        module.support_avx512bf16_for_cpu = False  # an attribute bitsandbytes reads at each forward


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(model_name: str, cfg: FinetuneConfig, device: str,
                base_model: PreTrainedModel | None = None) -> tuple[nn.Module, list[str]]:
    """The model to train, with exactly the weights of `cfg.mode` trainable, and notes for the log.

    full: every weight (untied from the input embedding first for ghost clipping). lora: peft
    adapters on a frozen base. qlora: the base loaded in 4-bit NF4 (frozen) with LoRA adapters on
    top. The base is moved to `device` before peft wraps it (opacus issue #820: with newer peft,
    LoRA updates were silently corrupted when the model reached its device only after wrapping).
    `base_model` (optional) is an already loaded base to use instead, modified in place.
    """
    notes: list[str] = []
    model = base_model or load_base_model(model_name, mode=cfg.mode, dtype=cfg.dtype, device=device,
                                          seed=cfg.seed, for_training=True)
    if cfg.mode == "qlora":
        require(is_quantized_4bit(model),
                f"mode qlora needs a base that bitsandbytes can quantise, but {model_name} loaded unquantised "
                f"(tiny test presets are built in memory: save one with save_pretrained and pass the directory)")
        # casts the few unquantised weights (norms, embeddings) to float32 and freezes everything;
        # gradient checkpointing stays off: Opacus's hooks need each layer's activations
        model = peft_module().prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_weights_differentiable(model)
    else:
        model = model.to(device)
    if cfg.mode == "full" and cfg.top_layers is not None:
        return model, [train_top_blocks(model, cfg.top_layers)]
    if cfg.mode == "full":
        model.requires_grad_(True)
        if cfg.dp and cfg.grad_sample_mode == "ghost" and embeddings_tied(model):
            added = untie_embeddings(model)
            notes.append(f"ghost clipping does not support tied weights: the LM head was untied from the input "
                         f"embedding, adding {added:,} trainable parameters")
        return model, notes
    with quiet_transformers():
        model = peft_module().get_peft_model(model, lora_config(cfg, model))
    return model, notes


def train_top_blocks(model: nn.Module, top_layers: int) -> str:
    """Make only the top `top_layers` transformer blocks and the final norm trainable; return a note.

    Embeddings and the LM head stay frozen (tied in SmolLM2 and GPT-2, so untying is never needed),
    which is what lets the frozen blocks below be computed once per record (`dpnb.training.prefix_cache`).
    """
    parts = model_parts(model)
    require(top_layers <= parts.depth,
            f"finetune.top_layers = {top_layers} but the model has {parts.depth} blocks; choose at most {parts.depth}")
    model.requires_grad_(False)
    for block in parts.blocks[parts.depth - top_layers:]:
        block.requires_grad_(True)
    parts.norm.requires_grad_(True)
    return (f"mode full restricted to the top {top_layers} of {parts.depth} blocks and the final norm "
            f"(embeddings and LM head frozen)")


def model_card(model_name: str, cfg: FinetuneConfig, notes: Sequence[str]) -> dict[str, Any]:
    """dpnb_model.json: what `load_trained` needs to rebuild the model."""
    untied = any("untied" in note for note in notes)
    card = {"base": model_name, "mode": cfg.mode, "dtype": cfg.dtype, "base_seed": cfg.seed, "dp": cfg.dp,
            "untied_embeddings": untied, "top_layers": cfg.top_layers,
            "noise": ("drawn from the config seed: NOT a DP release (finetune.deterministic: true)"
                      if cfg.deterministic else "drawn from OS entropy; the seed does not determine it")}
    return card
