"""The fast sampler's forward pass: a supported causal LM over a static key/value cache.

It computes the model's next-token logits, as the model's own forward would up to float rounding:
embeddings, norms, activations, the rotary embedding and every projection that is not a plain linear
layer are the model's own modules (so LoRA layers, biases and rope scaling behave as in the model);
only attention, the cache and plain linear layers' products are done here. Supported: Llama-architecture
models (SmolLM2, Llama 2/3) and GPT-2; `is_supported(model)` says whether a model is one of them.

Why it is fast on a CPU:

- a static cache, allocated once per call (layers x rows x kv heads x positions): each step writes one
  position per row in place, where `generate`'s dynamic cache concatenates (copies) every step. Keys
  are stored transposed (head_dim x positions), so that q k^T reads each row's keys along their rows
  (measured 1.1x faster in float32 and 2.6x in bf16 than a product with a transposed slice);
- a prefix every row shares (a label's prompt) is kept once, and every row attends to that one copy
  in one matrix product for all rows;
- plain linear layers' weights are reordered once for oneDNN's matrix products, in float32 and in
  bfloat16 (`Runner.pack`): PyTorch's default CPU product repacks the weight matrix on every call,
  which at decoding's few rows costs more than the arithmetic (float32: about 2.5x slower measured
  here). Projections that read one input (q/k/v) become one product, and oneDNN applies the
  residual addition, SiLU and the gate's product in the same pass (fewer passes over the rows'
  activations). Costs a copy of the weights while the runner lives.

Attention is the model's (softmax of q k^T * scaling over the visible keys, in float32, as Hugging
Face's eager attention computes it), query head h reading key/value head h // (heads / kv heads) as
`repeat_kv` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from dpnb.errors import DpnbError, require

SUPPORTED_MODEL_TYPES = ("llama", "gpt2")


def unwrap(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (its LoRA layers stay in place), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_supported(model: Any) -> bool:
    """Whether the fast sampler can run this model (a Llama-architecture or GPT-2 causal LM)."""
    try:
        runner_for(model)
    except DpnbError:
        return False
    return True


def context_limit(model: Any) -> int | None:
    """The model's positions (None when its config does not say)."""
    config = unwrap(model).config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def runner_for(model: Any) -> Runner:
    """The forward pass of a supported model, or a DpnbError saying why it is not supported."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    require(kind in SUPPORTED_MODEL_TYPES,
            f"fast sampling supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {kind!r}; "
            f"sample it with Hugging Face generate (generate.engine hf) instead")
    if kind == "llama":
        layers = list(model.model.layers[: config.num_hidden_layers])
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        silu = all(_is_silu(layer.mlp.act_fn) for layer in layers)
        return Runner(model, kind, layers, heads, kv_heads, layers[0].self_attn.head_dim, silu=silu)
    require(not getattr(config, "add_cross_attention", False),
            "fast sampling does not support GPT-2 with cross-attention; use Hugging Face generate")
    layers = list(model.transformer.h)
    heads = config.num_attention_heads
    return Runner(model, kind, layers, heads, heads, layers[0].attn.head_dim)


# --------------------------------------------------------------------------- linear layers


def _packing_available() -> bool:
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise"))


def _plain_weight(module: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as out x in, bias) of a plain linear layer (nn.Linear, GPT-2's Conv1D), else None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    if type(module) is torch.nn.Linear:
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    if type(module) is Conv1D:  # y = x @ weight + bias, weight in x out
        return module.weight.detach().t(), module.bias.detach()
    return None


@dataclass
class Linear:
    """One or more linear layers that read the same input, as one product when packed (outputs side by side).

    Unpacked, it calls the modules. Packed (`Linear.packed`), it runs oneDNN's product over weights
    reordered once, with the residual addition (`plus`), SiLU (`silu`) or a product (`times`) applied
    in the same pass.
    """

    modules: tuple[Any, ...]
    weight: torch.Tensor | None = None  # oneDNN's reordered weight (None: call the modules)
    bias: torch.Tensor | None = None

    @classmethod
    def packed(cls, modules: tuple[Any, ...], rows: int) -> Linear | None:
        """The packed product of `modules`, or None where it would not give the modules' outputs."""
        weights = [_plain_weight(m) for m in modules]
        if any(w is None for w in weights):
            return None
        matrices = [w[0] for w in weights if w is not None]
        biases = [w[1] for w in weights if w is not None]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None
        weight = torch.cat(matrices).contiguous()
        bias = None if biases[0] is None else torch.cat([b for b in biases if b is not None]).contiguous()
        linear = cls(modules, torch.ops.mkldnn._reorder_linear_weight(weight, rows), bias)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        expected = torch.cat([m(probe) for m in modules], dim=-1).float()
        got = linear(probe).float()
        tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2  # bf16: 8 bits of mantissa
        scale = float(expected.abs().max()) + 1e-6
        if not torch.allclose(got, expected, rtol=tolerance, atol=tolerance * scale):
            return None
        return linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The modules' outputs side by side."""
        if self.weight is None:
            outputs = [module(x) for module in self.modules]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """other + the layer's output (a residual connection)."""
        if self.weight is None:
            return other + self.modules[0](x)
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, "add")

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The layer's output times `other`, elementwise."""
        if self.weight is None:
            return other * self.modules[0](x)
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, "mul")

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU of the layer's output."""
        if self.weight is None:
            return torch.nn.functional.silu(self.modules[0](x))
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "swish", [], "")


def _is_silu(activation: Any) -> bool:
    """Whether a model's activation module computes SiLU (then oneDNN can apply it inside the product)."""
    if not isinstance(activation, torch.nn.Module) or activation._forward_hooks or activation._forward_pre_hooks:
        return False
    probe = torch.linspace(-8, 8, 257)
    return torch.equal(activation(probe), torch.nn.functional.silu(probe))


# --------------------------------------------------------------------------- the cache and attention


@dataclass
class Cache:
    """Keys and values: a prefix every row shares, then each row's own positions.

    keys (layers, rows, kv heads, head_dim, capacity) and values (layers, rows, kv heads, capacity,
    head_dim) hold position `start + i` of a row at index i; shared_keys (layers, kv heads, head_dim,
    start) and shared_values (layers, kv heads, start, head_dim) hold the positions below start.
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: int = 0
    shared_keys: torch.Tensor | None = None
    shared_values: torch.Tensor | None = None

    def copy_row(self, row: int, source: Cache, source_row: int, length: int) -> None:
        """Put the first `length` positions of `source`'s row `source_row` into this cache's row `row`."""
        self.keys[:, row, ..., :length] = source.keys[:, source_row, ..., :length]
        self.values[:, row, :, :length] = source.values[:, source_row, :, :length]

    def move_rows(self, sources: list[int], targets: list[int]) -> None:
        """Copy whole rows `sources` onto rows `targets`."""
        source = torch.tensor(sources, device=self.keys.device)
        target = torch.tensor(targets, device=self.keys.device)
        self.keys[:, target] = self.keys[:, source]
        self.values[:, target] = self.values[:, source]


def _attend(q: torch.Tensor, cache: Cache, layer: int, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of queries (rows, steps, heads, head_dim) over the shared prefix and each row's keys.

    `bias` (rows * kv heads, group * steps, length) is 0 where a row's own key at index < length may be
    seen and -inf where not; the shared prefix is seen by all. Returns (rows, steps, heads * head_dim).
    """
    rows, steps, heads, head_dim = q.shape
    kv_heads, prefix, length = cache.keys.shape[2], cache.start, bias.shape[-1]
    group = heads // kv_heads
    split = q.view(rows, steps, kv_heads, group, head_dim)  # query (g, t) of a row at g * steps + t
    per_row = split.permute(0, 2, 3, 1, 4).reshape(rows * kv_heads, group * steps, head_dim)
    keys = cache.keys[layer, :rows, ..., :length].reshape(rows * kv_heads, head_dim, length)
    scores = torch.baddbmm(bias, per_row, keys, alpha=scaling)  # the keys' slice is read where it lies
    if prefix:  # one product for every row: the prefix's keys are the same for all
        flat = split.permute(2, 0, 3, 1, 4).reshape(kv_heads, rows * group * steps, head_dim)
        shared = torch.bmm(flat, cache.shared_keys[layer]).mul_(scaling)
        shared = shared.view(kv_heads, rows, group * steps, prefix).transpose(0, 1)
        scores = torch.cat([shared, scores.view(rows, kv_heads, group * steps, length)], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = weights.view(rows * kv_heads, group * steps, prefix + length)
    values = cache.values[layer, :rows, :, :length].reshape(rows * kv_heads, length, head_dim)
    out = torch.bmm(weights[..., prefix:], values)
    if prefix:
        flat = weights[..., :prefix].view(rows, kv_heads, group * steps, prefix).transpose(0, 1)
        shared = torch.bmm(flat.reshape(kv_heads, rows * group * steps, prefix), cache.shared_values[layer])
        out.view(rows, kv_heads, group * steps, head_dim).add_(
            shared.view(kv_heads, rows, group * steps, head_dim).transpose(0, 1))
    out = out.view(rows, kv_heads, group, steps, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(rows, steps, heads * head_dim)


# --------------------------------------------------------------------------- the runner

Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class Runner:
    """A supported model's forward pass over a static cache, built from its own modules."""

    model: Any
    kind: str  # "llama" or "gpt2"
    layers: list[Any]
    heads: int
    kv_heads: int
    head_dim: int
    linears: dict[tuple[int, ...], Linear] = field(default_factory=dict)  # module ids -> packed product
    silu: bool = False  # the MLP's activation is SiLU (applied by oneDNN inside the gate's product when packed)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def linear(self, *modules: Any) -> Linear:
        """The product of `modules` (packed by `pack`, else calling them)."""
        return self.linears.get(tuple(map(id, modules))) or Linear(modules)

    def projection_groups(self) -> list[tuple[Any, ...]]:
        """The linear layers of the forward pass; those of a group read one input and become one product."""
        groups: list[tuple[Any, ...]] = []
        for layer in self.layers:
            if self.kind == "llama":
                attn, mlp = layer.self_attn, layer.mlp
                groups += [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj,), (mlp.up_proj,),
                           (mlp.down_proj,)]
            else:
                groups += [(layer.attn.c_attn,), (layer.attn.c_proj,), (layer.mlp.c_fc,), (layer.mlp.c_proj,)]
        return [*groups, (self.model.lm_head,)]

    def pack(self, rows: int) -> None:
        """Reorder the plain linear layers' weights once for oneDNN's products (a CPU, float32 or bfloat16).

        `rows`: the rows a product usually has (oneDNN's layout hint). Anything that is not a plain
        linear layer (LoRA layers, hooks) keeps its module.
        """
        if (self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16)
                or not _packing_available()):
            return
        with torch.inference_mode():
            for modules in self.projection_groups():
                packed = Linear.packed(modules, rows)
                if packed is not None:
                    self.linears[tuple(map(id, modules))] = packed

    def new_cache(self, rows: int, capacity: int, shared: Cache | None = None) -> Cache:
        """A cache of `rows` x `capacity` positions after `shared`'s single row (if any), zeros (finite:
        a masked key or value is multiplied by a weight of 0, and 0 x NaN would be NaN)."""
        keys = torch.zeros(len(self.layers), rows, self.kv_heads, self.head_dim, capacity, dtype=self.dtype,
                           device=self.device)
        values = torch.zeros(len(self.layers), rows, self.kv_heads, capacity, self.head_dim, dtype=self.dtype,
                             device=self.device)
        if shared is None:
            return Cache(keys, values)
        return Cache(keys, values, shared.keys.shape[-1], shared.keys[:, 0], shared.values[:, 0])

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache,
               last: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits after token `last[r]` (default: the last) of each row of `tokens` (rows, steps).

        Writes the tokens' keys and values into the first rows of `cache` at `positions` (rows, steps);
        each query sees the keys at positions up to its own, which must all hold this row's sample
        (the shared prefix, the rest of its prompt and its earlier tokens). Steps after a row's `last`
        (padding) write keys at later positions, which later tokens overwrite before anything reads them.
        """
        rows, steps = tokens.shape
        index = positions - cache.start
        length = int(index.max()) + 1
        row_index = torch.arange(rows, device=tokens.device)[:, None]
        hidden_by = torch.arange(cache.start, cache.start + length, device=tokens.device) > positions[:, :, None]
        bias = torch.zeros(rows, steps, length, dtype=self.dtype, device=tokens.device)
        bias.masked_fill_(hidden_by, -torch.inf)
        group = self.heads // self.kv_heads
        bias = bias[:, None, None].expand(rows, self.kv_heads, group, steps, length)
        bias = bias.reshape(rows * self.kv_heads, group * steps, length)

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
            cache.keys[layer][row_index, :, :, index] = k
            cache.values[layer][row_index, :, index] = v
            return _attend(q, cache, layer, bias, scaling)

        forward = self._llama if self.kind == "llama" else self._gpt2
        hidden, final_norm = forward(tokens, positions, attention)
        last_hidden = hidden[:, -1] if last is None else hidden[row_index[:, 0], last]
        return self.linear(self.model.lm_head)(final_norm(last_hidden))

    def _llama(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention) -> tuple[torch.Tensor, Any]:
        base = self.model.model
        hidden = base.embed_tokens(tokens)
        cos, sin = base.rotary_emb(hidden, positions)
        half = self.head_dim // 2
        # rotate_half(x) * sin = roll(x, half) * (sin with its first half negated)
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(2)
        cos = cos.unsqueeze(2)  # broadcast over heads
        rows, steps = tokens.shape
        rotated_heads = self.heads + self.kv_heads  # q and k, rotated together
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = self.linear(attn.q_proj, attn.k_proj, attn.v_proj)(layer.input_layernorm(hidden))
            qkv = qkv.view(rows, steps, rotated_heads + self.kv_heads, self.head_dim)
            qk = qkv[:, :, :rotated_heads]
            qk = qk * cos + qk.roll(half, dims=-1) * signed_sin
            out = attention(index, qk[:, :, : self.heads], qk[:, :, self.heads:], qkv[:, :, rotated_heads:],
                            attn.scaling)
            hidden = self.linear(attn.o_proj).plus(out, hidden)
            x = layer.post_attention_layernorm(hidden)  # LlamaMLP: down(act(gate(x)) * up(x))
            if self.silu:
                inner = self.linear(mlp.up_proj).times(x, self.linear(mlp.gate_proj).silu(x))
            else:
                inner = mlp.act_fn(self.linear(mlp.gate_proj)(x)) * self.linear(mlp.up_proj)(x)
            hidden = self.linear(mlp.down_proj).plus(inner, hidden)
        return hidden, base.norm

    def _gpt2(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention) -> tuple[torch.Tensor, Any]:
        base = self.model.transformer
        hidden = base.wte(tokens) + base.wpe(positions)
        rows, steps = tokens.shape
        shape = (rows, steps, self.heads, self.head_dim)
        for index, block in enumerate(self.layers):
            attn, mlp = block.attn, block.mlp  # GPT2MLP: c_proj(act(c_fc(x))), its dropout off in eval mode
            q, k, v = self.linear(attn.c_attn)(block.ln_1(hidden)).split(self.heads * self.head_dim, dim=-1)
            out = attention(index, q.view(shape), k.view(shape), v.view(shape), attn.scaling)
            hidden = self.linear(attn.c_proj).plus(out, hidden)
            hidden = self.linear(mlp.c_proj).plus(mlp.act(self.linear(mlp.c_fc)(block.ln_2(hidden))), hidden)
        return hidden, base.ln_f
