"""The dataset card of a sampled set: the privacy guarantee it carries (or its absence) and how it was made.

**Why samples keep the model's guarantee.** Differential privacy is closed under post-processing:
if the fine-tuned model M(D) is (epsilon, delta)-DP with respect to the training set D, then so is
f(M(D)) for any function f that reads D only through M(D). Sampling from the model, cutting at EOS,
stripping whitespace and dropping degenerate samples read nothing but the model and public settings,
so the released set carries the same (epsilon, delta) however many samples it holds. A zero-shot set
(the base model, never fine-tuned) does not depend on the private data at all: epsilon = 0 with
respect to it. A model fine-tuned without DP gives no guarantee, and the card says so.

The figures come from privacy.json as the accountant wrote them, never recomputed; the headline
(epsilon, delta) is rounded UP (`dpnb.privacy.guarantee.round_up`), so a guarantee is never shown stronger
than it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpnb.errors import require
from dpnb.privacy.guarantee import check_privacy_record, round_up

KINDS = ("dp", "pe", "non_dp", "zero_shot", "unspecified")


@dataclass(frozen=True)
class Provenance:
    """Where a sampled set's model came from, for its dataset card.

    kind: "dp" (fine-tuned with DP-SGD; `privacy` holds privacy.json), "pe" (Private Evolution:
    `privacy` holds its privacy.json), "non_dp" (fine-tuned without DP: no guarantee), "zero_shot" (the
    base model, no private data used) or "unspecified".
    """

    kind: str
    model: str
    data: str | None = None
    privacy: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        require(self.kind in KINDS, f"provenance kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "dp" or (self.kind == "pe" and (self.privacy or {}).get("dp", True)):
            check_privacy_record(self.privacy or {})



def _fmt(value: float, significant: int = 3) -> str:
    return f"{round_up(value, significant):#.{significant}g}"  # "#": keep trailing zeros (8.00)


def guarantee_summary(provenance: Provenance) -> dict[str, Any]:
    """The privacy facts of a set, for generation.json (copied from privacy.json, never recomputed)."""
    if provenance.kind in ("dp", "pe"):
        keys = ("epsilon", "delta", "accountant", "epsilons", "noise_multiplier", "sample_rate", "steps",
                "max_grad_norm", "dataset_size", "mode", "mechanism")
        return {"kind": provenance.kind, **{k: (provenance.privacy or {}).get(k) for k in keys}}
    if provenance.kind == "zero_shot":
        return {"kind": "zero_shot", "epsilon": 0.0, "note": "no private data used: base model and prompts"}
    if provenance.kind == "non_dp":
        return {"kind": "non_dp", "epsilon": None, "note": "fine-tuned without DP: no privacy guarantee"}
    return {"kind": "unspecified", "epsilon": None, "note": "no privacy statement"}


def _privacy_section(provenance: Provenance) -> list[str]:
    data = provenance.data or "the private training data"
    if provenance.kind == "dp":
        p = provenance.privacy or {}
        others = ", ".join(f"{name}: {value}" for name, value in (p.get("epsilons") or {}).items()
                           if value is not None)
        rows = [
            ("epsilon", f"{p['epsilon']} ({p.get('accountant', '?')} accountant)"),
            ("epsilon by each accountant", others or "-"),
            ("delta", p["delta"]),
            ("noise multiplier", p.get("noise_multiplier")),
            ("sampling rate (expected batch / records)", p.get("sample_rate")),
            ("noise-adding steps", p.get("steps")),
            ("clipping norm", p.get("max_grad_norm")),
            ("training records", p.get("dataset_size")),
            ("fine-tuning", p.get("mode")),
        ]
        return [
            f"**(ε = {_fmt(p['epsilon'])}, δ = {_fmt(p['delta'])})-differential privacy** for every record "
            f"of {data}.",
            "",
            f"The model `{provenance.model}` was fine-tuned on the private data with DP-SGD (Opacus): each "
            "example's gradient clipped, Gaussian noise added to every step, the privacy spent counted by "
            "the accountant below over every noise-adding step. Sampling from the model and post-processing "
            "the samples read only the model and public settings, so by the post-processing property of "
            "differential privacy this data set carries the same guarantee, however many samples it holds. "
            "(ε and δ above are rounded up; the table gives the accountant's values.)",
            "",
            "The guarantee is per training record (one text). Someone who contributed k records is "
            "protected by the weaker group guarantee for k records.",
            "",
            *([f"**{p['release_note']}.**"] if p.get("dp_release") is False else
              [f"Noise: {p['release_note']}." if p.get("release_note") else
               "Noise: the record does not say where the noise came from; treat the guarantee with caution."]),
            "",
            "What stays outside the guarantee: anything computed from the private data by other means than "
            "this model, e.g. a filter that removes samples after comparing them with private records (the "
            "memorisation screen reports, it does not filter: this set is released unfiltered), and "
            "hyperparameters chosen by looking at results on the same private data.",
            "",
            "| privacy parameter | value |",
            "|---|---|",
            *[f"| {name} | {value} |" for name, value in rows],
        ]
    if provenance.kind == "pe":
        return _evolution_section(provenance, data)
    if provenance.kind == "non_dp":
        return [
            "**No DP guarantee.** The model that wrote these samples was fine-tuned on the private data "
            "WITHOUT differential privacy (privacy.json: `dp: false`). Nothing bounds what the samples "
            f"reveal about {data}: they may reproduce training records verbatim. Treat this set as being "
            "as sensitive as the private data itself; it exists as the non-private reference (ε = ∞).",
        ]
    if provenance.kind == "zero_shot":
        return [
            "**No private data was used.** These samples come from the base model "
            f"`{provenance.model}`, prompted with the label prompts alone and never fine-tuned. With respect "
            f"to {data} the set is (ε = 0)-differentially private: it does not depend on that data at all. "
            "(What the base model learnt in pre-training, from public data, is outside this statement.)",
            "",
            "It is the baseline that shows what DP fine-tuning adds over prompting alone.",
        ]
    return [
        "**No privacy statement.** This set was sampled with `dpnb.generation.sampling.sample_labelled` from a model "
        "whose training this card does not describe; make no privacy claim for it.",
    ]


def _evolution_section(provenance: Provenance, data: str) -> list[str]:
    """The privacy section of a Private Evolution set (`dpnb.generation.evolution`)."""
    p = provenance.privacy or {}
    if p.get("epsilon") is None:
        return ["**No DP guarantee.** This Private Evolution set was selected by EXACT votes of the private "
                f"records ({data}), or from a model trained without DP: nothing bounds what it reveals about them; "
                "it exists as the non-private reference (ε = ∞)."]
    mechanisms = p.get("mechanisms") or [{"name": "Private Evolution votes", "noise_multiplier": p.get(
        "noise_multiplier"), "sample_rate": p.get("sample_rate"), "steps": p.get("steps")}]
    rows = [("epsilon", f"{p['epsilon']} ({p.get('accountant', '?')} accountant)"), ("delta", p["delta"]),
            ("private records", p.get("dataset_size")),
            *[(f"{m['name']}: noise multiplier, sample rate, steps",
               f"{m['noise_multiplier']:.4g}, {m['sample_rate']:.4g}, {m['steps']}") for m in mechanisms]]
    before = p.get("composed_with") or []
    return [
        f"**(ε = {_fmt(p['epsilon'])}, δ = {_fmt(p['delta'])})-differential privacy** for every record of {data}.",
        "",
        f"Private Evolution: a pool of samples of `{provenance.model}` was voted on by the private records: each "
        "record voted for its nearest samples of its own label (sentence embeddings; one record moves the vote "
        "histogram by at most 1 in L2 norm), Gaussian noise was added to the histogram, and the samples with the "
        "most noisy votes were kept (between iterations, the model wrote variations of them). Only the noisy "
        "histograms reached the set, so it carries their guarantee, composed over the iterations.",
        *(["", "Before the votes, the pool already depended on the private data through: "
               + "; ".join(before) + ". The (ε, δ) above is that of ALL the mechanisms in the table, composed by "
               "one accountant (not the votes' alone)."] if before else []),
        "",
        *([f"**{p['release_note']}.**"] if p.get("dp_release") is False else
          [f"Noise: {p['release_note']}." if p.get("release_note") else "Noise: not stated; treat with caution."]),
        "",
        "| privacy parameter | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
    ]


def dataset_card(summary: dict[str, Any], provenance: Provenance) -> str:
    """The README.md of a sampled set: its privacy guarantee (or its absence) and how it was made."""
    not_released = provenance.kind == "dp" and (provenance.privacy or {}).get("dp_release") is False
    titles = {"dp": "Synthetic data, DP-trained but NOT a DP release" if not_released else "DP synthetic data",
              "pe": "DP synthetic data by Private Evolution",
              "non_dp": "Synthetic data (no DP)",
              "zero_shot": "Zero-shot synthetic data (base model, no private data)",
              "unspecified": "Synthetic data"}
    labels = summary["labels"]
    sampling = summary["sampling"]
    lines = [
        "---",
        "task_categories: [text-classification]",
        f"tags: [synthetic, dpnb{', differential-privacy' if provenance.kind in ('dp', 'pe') else ''}]",
        "---",
        "",
        f"# {titles[provenance.kind]}",
        "",
        f"{summary['kept_total']} labelled texts sampled from `{provenance.model}` with dpnb "
        f"(labels: {', '.join(labels)}).",
        "",
        "## Privacy",
        "",
        *_privacy_section(provenance),
        "",
        "## How it was made",
        "",
        f"- model: `{provenance.model}` on {summary['device']} ({summary['dtype']}), "
        f"weights hash {summary['model_fingerprint']}",
        f"- private data: {provenance.data or 'not stated'}",
        "- prompts, one per label (the tokens that start that label's training records):",
        *[f"  - {name}: `{json.dumps(summary['prompts'][name])[1:-1]}`" for name in labels],
        "- sampling: " + ", ".join(f"{k} {v}" for k, v in sampling.items()),
        "  (top_k 0 and top_p 1 mean off; the model's own generation defaults are not applied)",
        "- post-processing: prompt removed, cut at the first stop token (EOS or end of turn), special tokens "
        "and surrounding whitespace removed; samples dropped when empty, shorter than "
        f"{summary['postprocessing']['min_words']} words, or when one token makes up more than "
        f"{summary['postprocessing']['max_repeat_fraction']:.0%} of them.",
        "",
        "| label | requested | generated | kept |",
        "|---|---|---|---|",
        *[f"| {name} | {summary['requested'][name]} | {summary['generated'][name]} "
          f"| {summary['kept'][name]} |" for name in labels],
        "",
        "Dropped: " + ", ".join(f"{reason} {n}" for reason, n in summary["dropped"].items())
        + f"; {summary['hit_max_new_tokens']} kept samples ran to max_new_tokens without a stop token.",
        "",
        "## Files",
        "",
        "Columns `text`, `label` (int), `label_name`; rows grouped by label. "
        "`datasets.load_from_disk(this_directory)` or `dpnb.generation.sampling.load_synthetic` loads it; "
        "`samples.jsonl` and `samples.csv` hold the same rows; `generation.json` the counts and speed; "
        "`shards/` the raw samples (token ids).",
        "",
    ]
    return "\n".join(lines)



def privacy_statement(set_dir: str | os.PathLike) -> str:
    """The "Privacy" section of a set's dataset card (markdown)."""
    card = (Path(set_dir) / "README.md").read_text(encoding="utf-8")
    section = card.split("## Privacy\n", 1)[1]
    return section.split("\n## ", 1)[0].strip()
