"""Label-prompted sampling from a causal language model, sharded, resumable and post-processed.

For every label the model is fed the same prompt tokens that start that label's training records
(`PromptFormat.prompt_ids`) and samples a continuation: a synthetic record of that label. Sampling is
plain ancestral sampling with temperature T, top-k and top-p (nucleus): at each step the next token
is drawn from softmax(logits / T) restricted to the k most likely tokens and to the smallest set of
tokens whose probability reaches p, renormalised. A sample ends at the first stop token (EOS, or the
chat template's end of turn) or after `max_new_tokens`.

Samples are written in shards as they complete, so an interrupted run resumes where it stopped; each
shard is seeded from (seed, label, shard index) alone, so a resumed run gives exactly the samples of
an uninterrupted one. Post-processing (decode, strip, drop degenerate samples) reads only the samples
and public settings, which is why the set keeps the model's privacy guarantee (`dpnb.generation.dataset_card`).

Outputs of `sample_labelled`, in its `out_dir` (built aside and moved into place whole):

    shards/shard-00000.jsonl  raw samples (new token ids after the prompt, cut at the first stop token)
    shards/plan.json          what the shards were sampled with (model weights hash, prompts, settings)
    shards/log.jsonl          one line per shard: samples, new tokens, sampling seconds, sha256; a shard
                              counts as sampled once its line is written and its bytes match (else resampled)
    data-*.arrow, state.json  the `datasets` data set: text, label, label_name (`load_synthetic`)
    samples.jsonl, samples.csv  the same rows for readers without `datasets`
    README.md                 dataset card: the privacy guarantee (or its absence) and how the set was made
    generation.json           counts requested / generated / kept, dropped by reason, tokens per second
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import datasets
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from jinja2 import TemplateError
from tqdm import tqdm  # not tqdm.auto: its notebook bars need ipywidgets, not a dependency

from dpnb.config import GenerateConfig
from dpnb.errors import DpnbError, require
from dpnb.generation.dataset_card import Provenance, dataset_card, guarantee_summary
from dpnb.generation.engines import engine_name, open_engine
from dpnb.generation.next_token import SamplingSettings
from dpnb.io import (
    DamagedFile,
    append_jsonl,
    atomic_directory,
    publish_once,
    read_json,
    read_jsonl,
    to_json,
    write_json_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DROP_REASONS = ("empty", "too_short", "repetitive")
PLAN_VERSION = 2  # 2: each shard's log line holds its sha256


class LabelPrompt(Protocol):
    """What sampling needs from `dpnb.data.prompts.PromptFormat`: the prompt tokens of a label."""

    def prompt_ids(self, label_name: str, tokenizer: PreTrainedTokenizerBase) -> list[int]: ...


@dataclass(frozen=True)
class ShardSpec:
    """One shard: `n` samples of label `label`, the `shard_in_label`-th of that label's shards."""

    index: int
    label: int
    shard_in_label: int
    n: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}.jsonl"


# --------------------------------------------------------------------------- planning and seeding


def plan_shards(counts: Sequence[int], shard_size: int) -> list[ShardSpec]:
    """Split each label's requested count into shards of `shard_size` (the last one may be smaller).

    Shards hold one label each and are numbered label by label, so a shard's contents depend only on
    its label, its position in that label and the settings: never on how many shards ran before.
    """
    specs: list[ShardSpec] = []
    for label, count in enumerate(counts):
        for shard_in_label, start in enumerate(range(0, count, shard_size)):
            specs.append(ShardSpec(len(specs), label, shard_in_label, min(shard_size, count - start)))
    return specs


def shard_seed(seed: int, label: int, shard_in_label: int) -> int:
    """A 63-bit seed derived from (seed, label, shard) alone, so resuming reproduces every shard.

    Hashing (rather than e.g. seed + shard) keeps neighbouring seeds' random streams unrelated.
    """
    digest = hashlib.sha256(f"dpnb-generate:{seed}:{label}:{shard_in_label}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def model_fingerprint(model: PreTrainedModel) -> str:
    """A cheap identity of a model's weights: a hash of every tensor's name, shape, dtype and first values.

    Shards sampled from one model must never be mixed with shards of another (say, a model fine-tuned
    again). Hashing all weights of a 7B model would take a minute; the first 256 values of every
    tensor change whenever training changes that tensor, and cost milliseconds.
    """
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        head = tensor.detach().reshape(-1)[:256].cpu()
        head = head.float() if head.is_floating_point() else head
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- stop tokens


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template puts after an assistant turn (e.g. `<|im_end|>`), if any.

    Found by rendering a conversation whose assistant turn is a known marker and reading the first
    special token after it, so it works for any chat template without a list of token names.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "dpnb-end-of-turn-probe"
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": marker}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except (TemplateError, ValueError):  # templates may refuse this shape of conversation
        return None
    if not isinstance(rendered, str) or marker not in rendered:
        return None
    tail_ids = tokenizer(rendered.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return next((token for token in tail_ids if token in special), None)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None,
                   chat: bool = False) -> list[int]:
    """Tokens that end a sample: EOS (the tokenizer's and the model's), and the end of turn for chat."""
    stops: set[int] = set()
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if model_eos is not None:
        stops.update(int(t) for t in (model_eos if isinstance(model_eos, (list, tuple)) else [model_eos]))
    if chat and (eot := end_of_turn_id(tokenizer)) is not None:
        stops.add(eot)
    require(bool(stops), "the tokenizer has no EOS token, so samples could not end; use a model with one")
    return sorted(stops)


# --------------------------------------------------------------------------- post-processing


def clean_text(token_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> str:
    """Decode a sample's new tokens, dropping special tokens and surrounding whitespace."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


def most_frequent_share(token_ids: Sequence[int]) -> float:
    """max_t count(t) / n: the share of the sample taken by its most frequent token (0 when empty)."""
    if not token_ids:
        return 0.0
    return Counter(token_ids).most_common(1)[0][1] / len(token_ids)


def degeneracy_reason(text: str, token_ids: Sequence[int], min_words: int,
                      max_repeat_fraction: float) -> str | None:
    """Why a sample is unusable ("empty", "too_short", "repetitive"), or None to keep it.

    Too short: fewer than `min_words` whitespace-separated words. Repetitive: one token makes up more
    than `max_repeat_fraction` of the sample's tokens (a model stuck repeating itself).
    """
    if not text:
        return "empty"
    if len(text.split()) < min_words:
        return "too_short"
    if most_frequent_share(token_ids) > max_repeat_fraction:
        return "repetitive"
    return None


# --------------------------------------------------------------------------- shards


def _checksums(shards: Path) -> dict[int, str | None]:
    """Each shard's sha256 as its log line gives it (the line is written once the shard is in place)."""
    return {entry["shard"]: entry.get("sha256") for entry in read_jsonl(shards / "log.jsonl")}


def _read_shard(path: Path, spec: ShardSpec, checksum: str | None) -> list[dict[str, Any]]:
    """The samples of a shard; `DamagedFile` when its bytes are not the ones its log line vouches for."""
    data = path.read_bytes()
    if checksum is None or hashlib.sha256(data).hexdigest() != checksum:
        raise DamagedFile(f"{path} is damaged or unfinished (its bytes do not match the sha256 in log.jsonl)")
    records = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    if len(records) != spec.n or any(r["label"] != spec.label for r in records):
        raise DpnbError(
            f"{path} does not hold the {spec.n} samples of label {spec.label} it should; "
            f"delete {path.parent} to sample again"
        )
    return records


def _intact(path: Path, spec: ShardSpec, checksums: dict[int, str | None]) -> bool:
    """Whether the shard is on disk and intact; a damaged or unfinished one is deleted (so sampled again)."""
    if not path.exists():
        return False
    try:
        _read_shard(path, spec, checksums.get(spec.index))
    except DamagedFile as why:
        print(f"{why}: sampling it again")
        path.unlink()
        return False
    return True


def _prepare_shard_dir(out_dir: Path, plan: dict[str, Any], postprocessing: dict[str, Any],
                       overwrite: bool) -> None:
    """Keep shards sampled with exactly this plan and discard any others.

    A finished set in `out_dir` made another way (other sampling settings, model or post-processing)
    is never replaced unless `overwrite` says so.
    """
    shards = out_dir / "shards"
    plan_path = shards / "plan.json"
    same_plan = plan_path.exists() and read_json(plan_path) == json.loads(to_json(plan))
    finished = out_dir / "generation.json"
    if finished.exists() and not overwrite:
        if not same_plan or read_json(finished).get("postprocessing") != postprocessing:
            raise DpnbError(
                f"{out_dir} already holds a set sampled with other settings or another model; "
                f"choose another output directory or pass overwrite=True to replace it"
            )
    if same_plan:
        return
    if shards.exists():
        n_old = len(list(shards.glob("shard-*.jsonl")))
        if n_old:
            print(f"discarding {n_old} shard(s) in {shards} sampled with other settings or another model")
        shutil.rmtree(shards)
    shards.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path, plan)


def _sample_shards(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                   specs: list[ShardSpec], shards: Path, cfg: GenerateConfig, settings: SamplingSettings, engine: str,
                   label_names: Sequence[str], progress: bool, on_shard: Callable[[int], None] | None) -> None:
    """Sample every shard not on disk yet (or damaged) with `engine`, writing each atomically as soon as it
    is complete.

    A shard is one call of the engine: its label's prompt `n` times, seeded from (seed, label, shard)."""
    checksums = _checksums(shards)
    missing = [spec for spec in specs if not _intact(shards / spec.name, spec, checksums)]
    if not missing:
        return
    total = sum(spec.n for spec in specs)
    done = total - sum(spec.n for spec in missing)
    new_tokens_now, seconds_now = 0, 0.0
    bar = tqdm(total=total, initial=done, unit="sample", desc=f"sampling {shards.parent.name}",
               disable=not progress)
    try:
        with open_engine(engine, model, settings, tokenizer=tokenizer, scratch_dir=shards.parent.parent,
                         max_prompt_tokens=max(map(len, prompts))) as sampler:
            for spec in missing:
                bar.set_description(f"sampling {shards.parent.name} [{label_names[spec.label]}]")
                started = time.perf_counter()
                seed = shard_seed(cfg.seed, spec.label, spec.shard_in_label)
                rows = sampler.sample([prompts[spec.label]] * spec.n, seed)
                seconds = time.perf_counter() - started
                records = [{"label": spec.label, "label_name": label_names[spec.label],
                            "index": spec.shard_in_label * cfg.shard_size + i, "ids": token_ids, "stopped": stopped}
                           for i, (token_ids, stopped) in enumerate(rows)]
                bar.update(len(rows))
                # a sample's tokens: what it kept, plus the stop token the model also had to produce
                new_tokens = sum(len(r["ids"]) + r["stopped"] for r in records)
                text = "".join(json.dumps(r) + "\n" for r in records)
                write_text_atomic(shards / spec.name, text)
                append_jsonl(shards / "log.jsonl",  # the shard counts as done once this line vouches for it
                             {"shard": spec.index, "n": spec.n, "new_tokens": new_tokens, "wall_s": seconds,
                              "sha256": hashlib.sha256(text.encode()).hexdigest()})
                new_tokens_now, seconds_now = new_tokens_now + new_tokens, seconds_now + seconds
                bar.set_postfix(tokens_per_s=f"{new_tokens_now / max(seconds_now, 1e-9):.0f}")
                if on_shard is not None:
                    on_shard(spec.index)
    finally:
        bar.close()


def _shared_shards(shared_dir: Path, plan: dict[str, Any]) -> Path:
    """The shared directory of the shards of exactly this plan (model weights, prompts, settings)."""
    key = hashlib.sha256(to_json(plan).encode()).hexdigest()[:16]
    return shared_dir / f"shards-{key}"


def _complete(shards: Path, specs: list[ShardSpec]) -> bool:
    return shards.is_dir() and all((shards / spec.name).exists() for spec in specs)


def _copy_shards(source: Path, target: Path, specs: list[ShardSpec]) -> None:
    """Link the shards of `source` that `target` lacks into it, with their log lines (the sampling time)."""
    log = {entry["shard"]: entry for entry in read_jsonl(source / "log.jsonl")}
    for spec in specs:
        if not (target / spec.name).exists():
            _link_or_copy(str(source / spec.name), str(target / spec.name))
            if spec.index in log:
                append_jsonl(target / "log.jsonl", log[spec.index])


def _publish_shards(shards: Path, shared: Path) -> None:
    """Put a complete copy of `shards` at `shared` in one rename (other runs of the sweep may read it)."""
    publish_once(shared, lambda staging: shutil.copytree(shards, staging, dirs_exist_ok=True,
                                                         copy_function=_link_or_copy))


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a finished shard into the new directory (instant, no extra space), else copy it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_set(out_dir: Path, rows: dict[str, list[Any]], summary: dict[str, Any],
              provenance: Provenance) -> None:
    """Write the data set, its exports, card and generation.json, and move them into place at once.

    `rows` holds `text`, `label` and `label_name`; the shards in `out_dir/shards`, if any, are kept."""
    dataset = datasets.Dataset.from_dict(rows, features=_set_features())
    with atomic_directory(out_dir) as staging:
        if (out_dir / "shards").is_dir():
            shutil.copytree(out_dir / "shards", staging / "shards", copy_function=_link_or_copy)
        bars_were_off = are_progress_bars_disabled()
        disable_progress_bars()
        try:
            dataset.save_to_disk(str(staging))
        finally:
            if not bars_were_off:
                enable_progress_bars()
        records = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
        (staging / "samples.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows))
        writer.writeheader()
        writer.writerows(records)
        (staging / "samples.csv").write_text(buffer.getvalue(), encoding="utf-8")
        (staging / "README.md").write_text(dataset_card(summary, provenance), encoding="utf-8")
        (staging / "generation.json").write_text(to_json(summary), encoding="utf-8")


def _postprocess(
    specs: list[ShardSpec], shards: Path, tokenizer: PreTrainedTokenizerBase, label_names: Sequence[str],
    cfg: GenerateConfig,
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Read every shard in order, clean and filter its samples; return the kept rows and the counts."""
    rows: dict[str, list[Any]] = {"text": [], "label": [], "label_name": []}
    generated = dict.fromkeys(label_names, 0)
    kept = dict.fromkeys(label_names, 0)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    dropped_by_label = {name: dict.fromkeys(DROP_REASONS, 0) for name in label_names}
    hit_max = 0
    checksums = _checksums(shards)
    for spec in specs:
        records = _read_shard(shards / spec.name, spec, checksums.get(spec.index))
        texts = tokenizer.batch_decode([r["ids"] for r in records], skip_special_tokens=True)
        name = label_names[spec.label]
        for record, raw_text in zip(records, texts, strict=True):
            generated[name] += 1
            text = raw_text.strip()
            reason = degeneracy_reason(text, record["ids"], cfg.min_words, cfg.max_repeat_fraction)
            if reason is not None:
                dropped[reason] += 1
                dropped_by_label[name][reason] += 1
                continue
            kept[name] += 1
            hit_max += not record["stopped"]
            rows["text"].append(text)
            rows["label"].append(spec.label)
            rows["label_name"].append(name)
    counts = {"generated": generated, "kept": kept, "dropped": dropped, "dropped_by_label": dropped_by_label,
              "hit_max_new_tokens": hit_max}
    return rows, counts


def _speed(shards: Path, specs: list[ShardSpec]) -> dict[str, Any]:
    """Tokens per second over every shard's sampling time (earlier, interrupted sessions included)."""
    log = {entry["shard"]: entry for entry in read_jsonl(shards / "log.jsonl")}
    timed = [log[spec.index] for spec in specs if spec.index in log]
    new_tokens = sum(entry["new_tokens"] for entry in timed)
    seconds = sum(entry["wall_s"] for entry in timed)
    return {
        "new_tokens": new_tokens,
        "sampling_wall_s": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds, 2) if seconds > 0 else None,
        "timed_shards": len(timed),  # every shard: one without its log line is sampled again
    }


def sample_labelled(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: LabelPrompt,
    label_names: Sequence[str],
    cfg: GenerateConfig,
    out_dir: str | os.PathLike,
    *,
    provenance: Provenance | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    shared_dir: Path | None = None,
    precision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample `cfg.n_per_label` texts per label from any causal LM; write a labelled set to `out_dir`.

    `precision` (`dpnb.precision.Precision.record()`) says which format the model samples in and why;
    it is kept in generation.json.

    Shards already in `out_dir/shards` that were sampled with the same model weights, prompts and
    settings are kept, so an interrupted call resumes; others are discarded (or, when `out_dir` holds
    a finished set, refused unless `overwrite`). With `shared_dir` (the runs of a sweep, for the
    zero-shot set and PE's pool from the base model) the shards of the same plan are taken from there
    when an earlier run sampled them, and left there for later runs (`_shared_shards`).
    `on_shard(index)` runs after each shard is written (tests interrupt there). Returns the
    generation.json summary.
    """
    started = time.time()
    out_dir = Path(out_dir)
    provenance = provenance or Provenance("unspecified", getattr(model, "name_or_path", "") or "unnamed")
    label_names = list(label_names)
    chat = getattr(prompt_format, "style", "plain") == "chat"
    prompts = [list(prompt_format.prompt_ids(name, tokenizer)) for name in label_names]
    require(all(prompts), "a label prompt is empty: the model needs at least one token to start from")
    _check_context_fits(model, max(map(len, prompts)) + cfg.max_new_tokens)
    stop_ids = stop_token_ids(tokenizer, model, chat=chat)
    specs = plan_shards([cfg.n_per_label] * len(label_names), cfg.shard_size)
    engine = engine_name(cfg.engine, model)
    settings = SamplingSettings.from_config(cfg, stop_ids)
    plan = _shard_plan(model, label_names, prompts, stop_ids, _sampling_record(cfg, settings, engine))
    postprocessing = {"min_words": cfg.min_words, "max_repeat_fraction": cfg.max_repeat_fraction}
    _prepare_shard_dir(out_dir, plan, postprocessing, overwrite)
    shards = out_dir / "shards"
    shared = _shared_shards(shared_dir, plan) if shared_dir is not None else None
    if shared is not None and _complete(shared, specs):
        _copy_shards(shared, shards, specs)
        print(f"{out_dir.name}: {len(specs)} shards sampled alike by an earlier run of the sweep, from {shared}")
    _sample_shards(model, tokenizer, prompts, specs, shards, cfg, settings, engine, label_names, progress, on_shard)
    if shared is not None and not _complete(shared, specs):
        _publish_shards(shards, shared)

    rows, counts = _postprocess(specs, shards, tokenizer, label_names, cfg)
    summary = {
        "set": out_dir.name,
        "model": provenance.model,
        "guarantee": guarantee_summary(provenance),
        "labels": label_names,
        "requested": dict.fromkeys(label_names, cfg.n_per_label),
        **counts,
        "kept_total": len(rows["text"]),
        **_speed(shards, specs),
        "wall_time_s": round(time.time() - started, 2),
        "sampling": plan["sampling"],
        "postprocessing": postprocessing,
        "prompts": {name: tokenizer.decode(ids) for name, ids in zip(label_names, prompts, strict=True)},
        "stop_tokens": tokenizer.convert_ids_to_tokens(stop_ids),
        "device": plan["device"],
        "dtype": plan["dtype"],
        "precision": precision,
        "model_fingerprint": plan["model_fingerprint"],
        "shards": len(specs),
    }
    write_set(out_dir, rows, summary, provenance)
    return summary


def _shard_plan(model: PreTrainedModel, label_names: list[str], prompts: list[list[int]], stop_ids: list[int],
                sampling: dict[str, Any]) -> dict[str, Any]:
    """shards/plan.json: what the shards are sampled with; shards of another plan are never kept."""
    return {
        "version": PLAN_VERSION,
        "model_fingerprint": model_fingerprint(model),
        "device": model.device.type,
        "dtype": str(model.dtype).removeprefix("torch."),
        "labels": label_names,
        "prompt_ids": dict(zip(label_names, prompts, strict=True)),
        "stop_ids": stop_ids,
        "sampling": sampling,
    }


def _sampling_record(cfg: GenerateConfig, settings: SamplingSettings, engine: str) -> dict[str, Any]:
    """What the plan and generation.json say about sampling: the engine, the settings, the shards, the seed."""
    return {"engine": engine, **settings.record(), "shard_size": cfg.shard_size, "n_per_label": cfg.n_per_label,
            "seed": cfg.seed}


def _check_context_fits(model: PreTrainedModel, length: int) -> None:
    """Refuse a prompt + max_new_tokens longer than the model's positions (GPT-2 would fail mid-run)."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and length > limit:
        raise DpnbError(
            f"prompt + max_new_tokens = {length} tokens exceeds the model's context of {limit}; "
            f"lower generate.max_new_tokens by at least {length - limit}"
        )


def _set_features() -> datasets.Features:
    string, integer = datasets.Value("string"), datasets.Value("int64")
    return datasets.Features({"text": string, "label": integer, "label_name": string})


def load_synthetic(path: str | os.PathLike) -> datasets.Dataset:
    """The labelled set (`text`, `label`, `label_name`) that `sample_labelled` or `run_stage` wrote.

    A set whose samples were all dropped as degenerate loads as an empty set: `datasets` saves one
    with no data file, and its `load_from_disk` then fails with an IndexError.
    """
    path = Path(path)
    if not (path / "state.json").exists():
        raise DpnbError(f"{path} holds no sampled data set: run the generate stage (03_generate) first")
    if not read_json(path / "state.json").get("_data_files"):
        return datasets.Dataset.from_dict({"text": [], "label": [], "label_name": []}, features=_set_features())
    return datasets.load_from_disk(str(path))
