"""Fast label-prompted sampling from a causal LM: many continuations of a few prompts.

What it computes. Each sample continues its prompt one token at a time (ancestral sampling). At every
step the model's next-token logits `l` (in float32) go through exactly the pipeline Hugging Face's
`generate` applies for plain sampling, in the same order:

1. min_new_tokens: while a sample has fewer than `min_new_tokens` new tokens, the stop tokens' logits
   are -inf (MinNewTokensLengthLogitsProcessor);
2. temperature: `s = l / temperature` (TemperatureLogitsWarper);
3. top-k (`top_k > 0`): tokens whose score is below the k-th largest are removed; ties with the k-th
   are kept (TopKLogitsWarper);
4. top-p (`top_p < 1`): with the remaining tokens sorted by probability `q = softmax(s)` from the
   largest, a token is kept when the probability of the tokens before it is below `top_p`: the
   smallest head of the ranking whose mass reaches `top_p`, never less than one token (TopPLogitsWarper,
   which removes the tokens whose ascending cumulative probability is at most 1 - top_p);
5. the next token is drawn from `softmax(s)` renormalised over the kept tokens.

With `do_sample=False` the token is `argmax(l)` after step 1 (greedy, like `generate`). A sample ends
after its first stop token or after `max_new_tokens` tokens; it is returned as its new tokens before
the first stop token and whether a stop token ended it (the format of `strip_prompt_and_cut`).

Why it is faster than `generate` on a CPU, with the same distribution:

- the prompt runs through the model once, not once per row. The prefix all prompts share (with one
  prompt: all of it but its last token) is kept once and every row attends to that one copy (one
  matrix product for all rows); the rest of each distinct prompt is computed once and copied into
  the rows that continue it;
- on a CPU, float32 weights are reordered once per call for oneDNN's matrix products, the
  projections that read one input (q/k/v, gate/up) fused into one product: PyTorch's default path
  repacks each weight matrix on every call, which at decoding's few rows costs more than the
  arithmetic (about 90 against 200 GFLOP/s per core measured here). Costs a copy of the weights
  for the call's duration; `prepack=False` turns it off;
- a static key/value cache, allocated once (layers x rows x heads x positions): each step writes one
  position per row in place, where `generate`'s dynamic cache concatenates (copies) every step;
- continuous batching: every row has its own position and attention mask, so a row whose sample ends
  takes the next pending sample at once instead of idling until the slowest row of its batch ends;
  when none is pending the live rows are packed to the front and the batch shrinks;
- top-p without sorting the vocabulary (generate sorts all 49k logits of every row every step, and
  draws with `torch.multinomial` over all of them: about half its time at the demo's settings). The
  kept set is the head of the ranking that first reaches `top_p` of the mass, so it lies inside any
  head holding at least `top_p`: the tokens above a probability cut (a few hundred) are gathered and
  sorted, and the row is settled when they hold `top_p` of the mass (checked per row); otherwise a
  lower cut that always holds it, then (float rounding) a full sort. The draw inverts the cumulative
  distribution of the kept tokens at one uniform number (float64).

Exactness: the kept set and its probabilities are the definition above, computed in float64 from
the float32 softmax. `generate` sums float32 probabilities from the smallest, so the two can differ
by the one boundary token when the mass before it is within about 1e-6 of `top_p`; nothing else
differs. Greedy decoding gives `generate`'s tokens as long as float rounding (attention and matrix
products are done in a different order) does not flip an argmax between near-equal logits.

The forward pass calls the model's own modules (embeddings, norms, activations, rotary embedding,
and every projection that is not a plain linear layer), so LoRA layers, biases and rope scaling
behave as in the model; only attention, the cache and plain linear layers' products are done here.
Supported: Llama-architecture models (SmolLM2, Llama 2/3) and GPT-2; `is_supported(model)` says
whether a model is one of them.

Randomness: every draw uses `generator` (the global torch generator when None), so a seeded
generator gives the same samples on the same machine. As with `generate`, the samples depend on
`batch_size` (how many rows run together), not only on the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.pytorch_utils import Conv1D

from dpnb.errors import DpnbError, require

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama", "gpt2")

Sample = tuple[list[int], bool]  # new tokens before the first stop token, and whether a stop token ended it


# --------------------------------------------------------------------------- token selection

Groups = list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]


def _candidates(scores: torch.Tensor, top_k: int, top_p: float, head_cuts: Sequence[float] | None = None) -> Groups:
    """The tokens each row may draw and their unnormalised probabilities (steps 3-5 of the docstring).

    `scores` (rows x vocabulary) are logits after min_new_tokens and temperature. Returns groups
    (row indices, token ids or None for "the whole vocabulary in order", weights), together covering
    every row once; a row draws token ids[j] with probability weights[j] / sum(weights).

    Top-p alone: the kept set lies inside every head of the ranking that holds at least top_p of the
    mass, so it is found among the tokens of probability >= cut, for the first cut of `head_cuts`
    (default: (1 - top_p) / 2000, then (1 - top_p) / vocabulary, which always holds it: the tokens
    below it weigh less than 1 - top_p together) whose tokens hold top_p (checked per row); only
    those few are sorted. Rows no cut settles are sorted in full.
    """
    rows, vocab = scores.shape
    every_row = torch.arange(rows, device=scores.device)
    k_cut = top_k if 0 < top_k < vocab else 0
    if not k_cut and top_p >= 1.0:
        return [(every_row, None, scores.softmax(dim=-1))]
    groups: Groups = []
    if k_cut:
        values, ids = torch.topk(scores, k_cut, dim=-1)  # sorted from the largest
        weights = (values - values[:, :1]).exp_()
        if top_p < 1.0:
            weights, _ = _nucleus(weights, weights.sum(dim=-1, keepdim=True), top_p)
        # top-k keeps every token tied with the k-th score: settled here only without such ties
        settled = (scores >= values[:, -1:]).sum(dim=-1) == k_cut
        groups.append((every_row[settled], ids[settled], weights[settled]))
        left = every_row[~settled]
    else:
        probs = scores.softmax(dim=-1)
        left = every_row
        cuts = head_cuts if head_cuts is not None else ((1 - top_p) / 2000, (1 - top_p) / vocab)
        for cut in cuts:
            if not len(left):
                break
            settled, ids, weights = _head(probs if len(left) == rows else probs[left], cut, top_p)
            groups.append((left[settled], ids[settled], weights[settled]))
            left = left[~settled]
    if len(left):
        groups.append((left, *_candidates_by_sort(scores if len(left) == rows else scores[left], k_cut, top_p)))
    return [group for group in groups if len(group[0])]


def _head(probs: torch.Tensor, cut: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-p among the tokens of probability >= `cut`, sorted from the largest (padded with weight 0).

    Returns (settled, ids, weights): `settled` marks rows whose head holds at least top_p of the mass
    (so the kept set lies inside it); the other rows' ids and weights are meaningless.
    """
    rows = probs.shape[0]
    row, column = (probs >= cut).nonzero(as_tuple=True)  # row by row, columns ascending
    counts = torch.bincount(row, minlength=rows)
    width = max(int(counts.max()), 1)
    place = torch.arange(len(row), device=probs.device) - (counts.cumsum(0) - counts)[row]
    head = probs.new_zeros(rows, width)
    head[row, place] = probs[row, column]
    head_ids = torch.zeros(rows, width, dtype=torch.long, device=probs.device)
    head_ids[row, place] = column
    head, order = head.sort(dim=-1, descending=True)
    kept, mass = _nucleus(head, 1.0, top_p)
    return mass >= top_p, head_ids.gather(1, order), kept


def _nucleus(weights: torch.Tensor, total: torch.Tensor | float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights (sorted from the largest) of tokens after the first `top_p` of the mass.

    A token is kept when the probability of the tokens ranked before it is below top_p. Returns the
    filtered weights and the probability mass of all the given tokens (whether a head holds top_p).
    """
    cumulative = (weights.double() / total).cumsum(dim=-1)  # float64: the boundary is sharp
    before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
    return weights.masked_fill(before >= top_p, 0.0), cumulative[:, -1]


def _candidates_by_sort(scores: torch.Tensor, k_cut: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_candidates` for rows no head settles: a full sort of each row's scores."""
    values, ids = torch.sort(scores, dim=-1, descending=True)
    weights = (values - values[:, :1]).exp_()
    if k_cut:
        weights = weights.masked_fill(values < values[:, k_cut - 1: k_cut], 0.0)
    if top_p < 1.0:
        weights, _ = _nucleus(weights, weights.sum(dim=-1, keepdim=True), top_p)
    return ids, weights


def _processed_scores(logits: torch.Tensor, *, temperature: float, do_sample: bool,
                      stop_ids: torch.Tensor | None, under_min: torch.Tensor | None) -> torch.Tensor:
    """Steps 1-2: float32 logits with stop tokens at -inf for rows under min_new_tokens, over temperature.

    Works in place on float32 `logits`.
    """
    scores = logits.float()
    if stop_ids is not None and under_min is not None and bool(under_min.any()):
        rows = under_min.nonzero().squeeze(1)
        scores[rows[:, None], stop_ids[None, :]] = float("-inf")
    if do_sample and temperature != 1.0:
        scores = scores.div_(temperature)
    return scores


def _choose(scores: torch.Tensor, *, do_sample: bool, top_k: int, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of processed scores: greedy, or one draw from the filtered distribution."""
    if not do_sample:
        return scores.argmax(dim=-1)
    tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for rows, ids, weights in _candidates(scores, top_k, top_p):
        if ids is None:  # the whole vocabulary, in order
            tokens[rows] = torch.multinomial(weights, 1, generator=generator).squeeze(1)
            continue
        # sorted weights, the kept ones first: invert the cumulative distribution at a uniform draw
        cumulative = weights.double().cumsum(dim=-1)
        uniform = torch.rand(len(rows), 1, dtype=torch.float64, device=scores.device, generator=generator)
        drawn = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
        drawn = torch.minimum(drawn, (weights > 0).sum(dim=-1, keepdim=True) - 1)  # float rounding at the end
        tokens[rows] = ids.gather(1, drawn).squeeze(1)
    return tokens


def token_probabilities(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        head_cuts: Sequence[float] | None = None) -> torch.Tensor:
    """The distribution one sampling step draws from, per row of `logits` (rows x vocabulary).

    Dense (zeros for removed tokens) and computed by the same code the sampler uses; for checking
    it against Hugging Face's warpers. `head_cuts` overrides the probability cuts tried before a full
    sort (see `_candidates`; they change the speed, never the result).
    """
    scores = _processed_scores(logits.clone(), temperature=temperature, do_sample=True, stop_ids=None,
                               under_min=None)
    probs = torch.zeros_like(scores)
    for rows, ids, weights in _candidates(scores, top_k, top_p, head_cuts):
        normalised = weights / weights.sum(dim=-1, keepdim=True)
        if ids is None:
            probs[rows] = normalised
        else:
            probs[rows] = probs[rows].scatter_add(1, ids, normalised)  # padding: id 0, weight 0
    return probs


# --------------------------------------------------------------------------- the forward pass


def _unwrap(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (its LoRA layers stay in place), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_supported(model: Any) -> bool:
    """Whether `sample_continuations` can run this model (a Llama-architecture or GPT-2 causal LM)."""
    try:
        _runner(model)
    except DpnbError:
        return False
    return True


def _attend(q: torch.Tensor, cache: _Cache, layer: int, length: int, masked: torch.Tensor,
            scaling: float) -> torch.Tensor:
    """Causal attention of queries (rows, steps, heads, head_dim) over the shared prefix and each row's keys.

    Reads the shared prefix and the first `length` positions of each row's cache; `masked` (rows, 1,
    1, steps, prefix + length) is True where a key must not be seen. Query head h reads key/value
    head h // (heads / kv heads), as Hugging Face's repeat_kv does. Returns (rows, steps, heads * head_dim).
    """
    rows, steps, heads, head_dim = q.shape
    kv_heads, prefix = cache.keys.shape[2], cache.start
    group = heads // kv_heads
    width = group * steps
    grouped = q.view(rows, steps, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    grouped = grouped.reshape(rows, kv_heads, width, head_dim)
    scores = torch.matmul(grouped, cache.keys[layer, :rows, :, :length].transpose(-1, -2))
    if prefix:  # one matrix product for every row: the prefix's keys are the same for all
        flat = grouped.transpose(0, 1).reshape(kv_heads, rows * width, head_dim)
        shared = torch.matmul(flat, cache.shared_keys[layer].transpose(-1, -2))
        scores = torch.cat([shared.view(kv_heads, rows, width, prefix).transpose(0, 1), scores], dim=-1)
    scores = scores.float().mul_(scaling).view(rows, kv_heads, group, steps, prefix + length)
    weights = scores.masked_fill_(masked, float("-inf")).softmax(dim=-1).to(q.dtype)
    weights = weights.view(rows, kv_heads, width, prefix + length)
    out = torch.matmul(weights[..., prefix:], cache.values[layer, :rows, :, :length])
    if prefix:
        flat = weights[..., :prefix].transpose(0, 1).reshape(kv_heads, rows * width, prefix)
        out += torch.matmul(flat, cache.shared_values[layer]).view(kv_heads, rows, width, head_dim).transpose(0, 1)
    out = out.view(rows, kv_heads, group, steps, head_dim)
    return out.permute(0, 3, 1, 2, 4).reshape(rows, steps, heads * head_dim)


@dataclass
class _Cache:
    """Keys and values: a prefix every row shares, then each row's own positions.

    keys/values (layers, rows, kv heads, capacity, head_dim) hold position `start + i` of a row at
    index i; shared_keys/shared_values (layers, kv heads, start, head_dim) hold positions below start.
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: int = 0
    shared_keys: torch.Tensor | None = None
    shared_values: torch.Tensor | None = None


@dataclass
class _Runner:
    """A supported model's forward pass over a static cache, built from its own modules."""

    model: Any
    kind: str  # "llama" or "gpt2"
    layers: list[Any]
    heads: int
    kv_heads: int
    head_dim: int
    # see `pack`: module ids -> one product for them all, and each module's output width
    packed: dict[tuple[int, ...], tuple[Projection, list[int]]] = field(default_factory=dict)

    def project(self, modules: tuple[Any, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """Each module's output for input `x`: through the packed weights when `pack` made them."""
        packed = self.packed.get(tuple(map(id, modules)))
        if packed is None:
            return [module(x) for module in modules]
        projection, widths = packed
        return list(projection(x).split(widths, dim=-1)) if len(widths) > 1 else [projection(x)]

    def projection_groups(self) -> list[tuple[Any, ...]]:
        """The projections that read the same input, each group one matrix product when packed."""
        groups: list[tuple[Any, ...]] = []
        for layer in self.layers:
            if self.kind == "llama":
                attn, mlp = layer.self_attn, layer.mlp
                groups += [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj),
                           (mlp.down_proj,)]
            else:
                groups += [(layer.attn.c_attn,), (layer.attn.c_proj,), (layer.mlp.c_fc,), (layer.mlp.c_proj,)]
        return [*groups, (self.model.lm_head,)]

    def pack(self, rows: int) -> None:
        """Reorder the projection weights once for oneDNN's matrix products (float32 on a CPU).

        PyTorch's default CPU product repacks the weight matrix on every call; with the few rows of
        a decoding step that costs more than the arithmetic (about 90 against 200 GFLOP/s per core
        measured here). Each group of plain linear layers reading one input becomes one product.
        Only where the ops exist, and only for groups whose packed output matches the modules'
        on a probe input: anything else (LoRA layers, hooks, other dtypes) keeps its module.
        """
        if self.device.type != "cpu" or self.dtype != torch.float32 or not _packing_available():
            return
        with torch.inference_mode():
            for modules in self.projection_groups():
                packed = _packed_projection(modules, rows)
                if packed is not None:
                    self.packed[tuple(map(id, modules))] = packed

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def new_cache(self, rows: int, capacity: int, shared: _Cache | None = None) -> _Cache:
        """An empty cache of `rows` x `capacity` positions after `shared`'s single row (if any)."""
        shape = (len(self.layers), rows, self.kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if shared is None:
            return _Cache(keys, values)
        length = shared.keys.shape[3]
        return _Cache(keys, values, length, shared.keys[:, 0], shared.values[:, 0])

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor, cache: _Cache) -> torch.Tensor:
        """Next-token logits after the last of `tokens` (rows, steps) at `positions` (rows, steps).

        Writes the tokens' keys and values into the first rows of `cache` at their positions; each
        query sees the keys at positions up to its own, which must all hold this row's sample (the
        shared prefix, the rest of its prompt and its earlier tokens).
        """
        rows, steps = tokens.shape
        index = positions - cache.start
        length = int(index.max()) + 1
        row_index = torch.arange(rows, device=tokens.device)[:, None]
        key_positions = torch.arange(cache.start + length, device=tokens.device)
        masked = (key_positions[None, None, :] > positions[:, :, None]).view(rows, 1, 1, steps, -1)

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
            cache.keys[layer][row_index, :, index] = k
            cache.values[layer][row_index, :, index] = v
            return _attend(q, cache, layer, length, masked, scaling)

        if self.kind == "llama":
            return self._llama(tokens, positions, attention)
        return self._gpt2(tokens, positions, attention)

    def _llama(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Any) -> torch.Tensor:
        base = self.model.model
        hidden = base.embed_tokens(tokens)
        cos, sin = base.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
        rows, steps = tokens.shape
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q, k, v = self.project((attn.q_proj, attn.k_proj, attn.v_proj), x)
            q = q.view(rows, steps, self.heads, self.head_dim)
            k = k.view(rows, steps, self.kv_heads, self.head_dim)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            v = v.view(rows, steps, self.kv_heads, self.head_dim)
            hidden = hidden + self.project((attn.o_proj,), attention(index, q, k, v, attn.scaling))[0]
            mlp = layer.mlp  # LlamaMLP: down(act(gate(x)) * up(x))
            gate, up = self.project((mlp.gate_proj, mlp.up_proj), layer.post_attention_layernorm(hidden))
            hidden = hidden + self.project((mlp.down_proj,), mlp.act_fn(gate) * up)[0]
        return self.project((self.model.lm_head,), base.norm(hidden[:, -1]))[0]

    def _gpt2(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Any) -> torch.Tensor:
        base = self.model.transformer
        hidden = base.wte(tokens) + base.wpe(positions)
        rows, steps = tokens.shape
        width = self.heads * self.head_dim
        for index, block in enumerate(self.layers):
            attn = block.attn
            q, k, v = self.project((attn.c_attn,), block.ln_1(hidden))[0].split(width, dim=-1)
            shape = (rows, steps, self.heads, self.head_dim)
            out = attention(index, q.view(shape), k.view(shape), v.view(shape), attn.scaling)
            hidden = hidden + self.project((attn.c_proj,), out)[0]
            mlp = block.mlp  # GPT2MLP: c_proj(act(c_fc(x))), its dropout off in eval mode
            inner = mlp.act(self.project((mlp.c_fc,), block.ln_2(hidden))[0])
            hidden = hidden + self.project((mlp.c_proj,), inner)[0]
        return self.project((self.model.lm_head,), base.ln_f(hidden[:, -1]))[0]


Projection = Callable[[torch.Tensor], torch.Tensor]


def _packing_available() -> bool:
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise"))


def _linear_weight(module: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as out x in, bias) of a plain linear layer (nn.Linear, GPT-2's Conv1D), else None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    if type(module) is torch.nn.Linear:
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    if type(module) is Conv1D:  # y = x @ weight + bias, weight in x out
        return module.weight.detach().t(), module.bias.detach()
    return None


def _packed_projection(modules: tuple[Any, ...], rows: int) -> tuple[Projection, list[int]] | None:
    """One oneDNN product for all `modules` (their outputs side by side) and each one's width, or
    None where that would not give the modules' outputs."""
    weights = [_linear_weight(m) for m in modules]
    if any(w is None for w in weights):
        return None
    matrices = [w[0] for w in weights if w is not None]
    biases = [w[1] for w in weights if w is not None]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    weight = torch.cat(matrices).contiguous()
    bias = None if biases[0] is None else torch.cat([b for b in biases if b is not None]).contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def projection(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    expected = torch.cat([m(probe) for m in modules], dim=-1)
    if not torch.allclose(projection(probe), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-6):
        return None
    return projection, [m.shape[0] for m in matrices]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _runner(model: Any) -> _Runner:
    """The forward pass of a supported model, or a DpnbError saying why it is not supported."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    require(kind in SUPPORTED_MODEL_TYPES,
            f"fast sampling supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {kind!r}; "
            f"sample it with Hugging Face generate (dpnb's sample_batch) instead")
    if kind == "llama":
        layers = list(model.model.layers[: config.num_hidden_layers])
        attn = layers[0].self_attn
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        return _Runner(model, kind, layers, heads, kv_heads, attn.head_dim)
    require(not getattr(config, "add_cross_attention", False),
            "fast sampling does not support GPT-2 with cross-attention; use Hugging Face generate")
    layers = list(model.transformer.h)
    heads = config.num_attention_heads
    return _Runner(model, kind, layers, heads, heads, layers[0].attn.head_dim)


def _context_limit(model: Any) -> int | None:
    config = _unwrap(model).config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


# --------------------------------------------------------------------------- the sampler


@dataclass
class _Slot:
    """One row of the batch: which sample it holds, its prompt and how many new tokens it has."""

    sample: int
    prompt: int
    new_tokens: int
    position: int  # position of the token fed next (the sample's last token)
    token: int  # the token fed next


def continue_prompts(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Collection[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    min_new_tokens: int = 0,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    prepack: bool = True,
) -> list[Sample]:
    """One continuation of each prompt in `prompts` (see the module docstring); samples in prompt order.

    Identical prompts are run through the model once. `batch_size` rows are decoded together; a
    row whose sample ends takes the next one at once. `prepack`: on a CPU, reorder float32 weights
    once for oneDNN's matrix products (`_Runner.pack`; a copy of the weights for the call's duration).
    """
    require(len(prompts) > 0 and all(len(p) > 0 for p in prompts), "every prompt needs at least one token")
    require(max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {max_new_tokens}")
    require(0 <= min_new_tokens <= max_new_tokens,
            f"min_new_tokens = {min_new_tokens} must be between 0 and max_new_tokens ({max_new_tokens})")
    require(temperature > 0, f"temperature must be positive, got {temperature}")
    require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    require(top_k >= 0, f"top_k must be >= 0 (0 disables top-k), got {top_k}")
    require(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
    runner = _runner(model)
    longest = max(map(len, prompts))
    limit = _context_limit(model)
    require(limit is None or longest + max_new_tokens <= limit,
            f"prompt + max_new_tokens = {longest + max_new_tokens} tokens exceeds the model's context of {limit}")
    stops = sorted({int(t) for t in stop_ids})
    vocab = runner.model.get_output_embeddings().weight.shape[0]
    require(all(0 <= t < vocab for t in stops), f"stop ids must be token ids below the vocabulary size {vocab}")
    inner = _unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.inference_mode():
            if prepack:
                runner.pack(min(batch_size, len(prompts)))
            return _decode(runner, [list(map(int, p)) for p in prompts], max_new_tokens=max_new_tokens,
                           stop_ids=stops, temperature=temperature, top_p=top_p,
                           top_k=top_k, do_sample=do_sample, min_new_tokens=min_new_tokens,
                           batch_size=batch_size, generator=generator)
    finally:
        inner.train(was_training)


def sample_continuations(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    n: int,
    *,
    max_new_tokens: int,
    stop_ids: Collection[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    min_new_tokens: int = 0,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
) -> list[Sample]:
    """`n` continuations of one prompt (its keys and values computed once); see the module docstring."""
    require(n >= 1, f"n must be at least 1, got {n}")
    return continue_prompts(model, [prompt_ids] * n, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                            temperature=temperature, top_p=top_p, top_k=top_k, do_sample=do_sample,
                            min_new_tokens=min_new_tokens, batch_size=batch_size, generator=generator)


def _common_prefix(prompts: list[tuple[int, ...]]) -> int:
    """Length of the prefix every prompt starts with, leaving each prompt at least one token."""
    shortest = min(map(len, prompts))
    length = 0
    while length < shortest - 1 and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def _decode(runner: _Runner, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int],
            temperature: float, top_p: float, top_k: int, do_sample: bool, min_new_tokens: int,
            batch_size: int, generator: torch.Generator | None) -> list[Sample]:
    device = runner.device
    stop_set = set(stop_ids)
    stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None

    def choose(logits: torch.Tensor, new_tokens: list[int]) -> list[int]:
        under_min = None
        if min_new_tokens and stop_tensor is not None:
            under_min = torch.tensor([t < min_new_tokens for t in new_tokens], device=device)
        scores = _processed_scores(logits, temperature=temperature, do_sample=do_sample, stop_ids=stop_tensor,
                                   under_min=under_min)
        return _choose(scores, do_sample=do_sample, top_k=top_k, top_p=top_p, generator=generator).tolist()

    # each distinct prompt once; the prefix they all share (all but the last token of a single prompt)
    # once for all of them, read by every row from one copy
    distinct: dict[tuple[int, ...], int] = {}
    prompt_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    start = _common_prefix(list(distinct))
    shared = None
    if start:
        shared = runner.new_cache(1, start)
        runner.logits(torch.tensor([prompts[0][:start]], device=device), torch.arange(start, device=device)[None],
                      shared)
    prompt_cache: list[tuple[_Cache, torch.Tensor]] = []  # each prompt's positions after the prefix, logits
    for prompt in distinct:
        cache = runner.new_cache(1, len(prompt) - start, shared)
        tokens = torch.tensor([prompt[start:]], dtype=torch.long, device=device)
        logits = runner.logits(tokens, torch.arange(start, len(prompt), device=device)[None], cache)
        prompt_cache.append((cache, logits[0]))

    n_rows = min(batch_size, len(prompts))
    main = runner.new_cache(n_rows, max(map(len, distinct)) - start + max_new_tokens, shared)
    keys, values = main.keys, main.values
    holds = [-1] * n_rows  # prompt whose keys and values each row holds
    slots: list[_Slot | None] = [None] * n_rows
    results: list[Sample | None] = [None] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    pending = iter(range(len(prompts)))
    next_sample = next(pending, None)

    def finish(sample: int, token: int, new_tokens: int) -> bool:
        """Record `token`; True when it ends the sample."""
        if token in stop_set:
            results[sample] = (outputs[sample], True)
            return True
        outputs[sample].append(token)
        if new_tokens >= max_new_tokens:
            results[sample] = (outputs[sample], False)
            return True
        return False

    def fill(free: list[int]) -> None:
        """Start pending samples in the free rows: copy the prompt's cache, draw the first token."""
        nonlocal next_sample
        while free and next_sample is not None:
            starting: list[tuple[int, int]] = []
            while free and next_sample is not None:
                starting.append((free.pop(0), next_sample))
                next_sample = next(pending, None)
            for row, sample in starting:
                prompt = prompt_of[sample]
                if holds[row] != prompt:
                    own = prompt_cache[prompt][0]
                    length = own.keys.shape[3]
                    keys[:, row, :, :length] = own.keys[:, 0]
                    values[:, row, :, :length] = own.values[:, 0]
                    holds[row] = prompt
            logits = torch.stack([prompt_cache[prompt_of[sample]][1] for _, sample in starting])
            for (row, sample), token in zip(starting, choose(logits, [0] * len(starting)), strict=True):
                if finish(sample, token, 1):
                    free.append(row)
                    slots[row] = None
                else:
                    length = len(prompts[sample])
                    slots[row] = _Slot(sample, prompt_of[sample], 1, length, token)
            free.sort()

    def pack() -> int:
        """Move live rows into the free rows before them (nothing is pending); the live row count."""
        live = [row for row, slot in enumerate(slots) if slot is not None]
        holes = [row for row in range(len(live)) if slots[row] is None]
        movers = [row for row in live if row >= len(live)]
        if holes:
            source = torch.tensor(movers, device=device)
            target = torch.tensor(holes, device=device)
            keys[:, target] = keys[:, source]
            values[:, target] = values[:, source]
            for hole, mover in zip(holes, movers, strict=True):
                slots[hole], slots[mover] = slots[mover], None
                holds[hole], holds[mover] = holds[mover], -1
        return len(live)

    fill(list(range(n_rows)))
    while True:
        live = pack() if next_sample is None else n_rows
        if live == 0:
            break
        active = [slot for slot in slots[:live] if slot is not None]
        assert len(active) == live, "live rows are packed to the front"
        tokens = torch.tensor([[s.token] for s in active], dtype=torch.long, device=device)
        positions = torch.tensor([[s.position] for s in active], dtype=torch.long, device=device)
        logits = runner.logits(tokens, positions, main)
        chosen = choose(logits, [s.new_tokens for s in active])
        free: list[int] = []
        for row, (slot, token) in enumerate(zip(active, chosen, strict=True)):
            slot.new_tokens += 1
            if finish(slot.sample, token, slot.new_tokens):
                slots[row] = None
                free.append(row)
            else:
                slot.position += 1
                slot.token = token
        fill(free)
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]
