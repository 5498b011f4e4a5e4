"""06 audit: does the trained model leak its training records, and is the accounted epsilon honest?

The stage trains two twins with the run's fine-tuning config (`dpnb.training.loop.train`, exactly as stage 02
trains): one with DP, one without. Both train on the prepared records plus the canaries whose fair
coin came up "inserted" (`dpnb.auditing.canaries`), and both are attacked three ways (`dpnb.auditing.attacks`):

1. canary scores (model access): exposure, and the one-run lower bound on epsilon of Steinke, Nasr
   and Jagielski (2023). A lower bound above the accountant's epsilon means the package's privacy
   claim is wrong: the stage stops with an error. That can only happen when the claim is below the
   audit's ceiling (the bound had every guess been right, `attacks.audit_ceiling`), so each twin's
   `judgement` records the claim, the bound, the ceiling and a verdict that says which case it is;
2. canaries judged from text sampled from the twin alone (an n-gram attacker on synthetic data);
3. membership inference on real reviews: training members against held-out non-members.

Everything both twins share (canaries, coins, membership samples) is drawn once from the seed
before any training (`plan_audit`), so the guesses can depend only on the trained models.

The one-run theorem assumes one fixed mechanism whose input the coins choose. So the twins' plan
(the sampling rate q, the steps, delta, sigma and the divisor E) is made for N = n_train + repeats
x n_canaries records, as if every canary were inserted (`twin_plan_size`), and training runs that
plan on the records the coins actually put in (`dpnb.training.plan.plan_training`): flipping a coin changes
the data, never the mechanism. The guesses break ties with a stream of their own
(`dpnb.auditing.attacks.guess_membership`), not the one the coins are drawn from.

Writes `audit.json` (the summary) and `audit/`: canaries.json, base_losses.json and per twin
`<twin>/` (the finetune outputs, losses.json, synthetic/, audit.json with every per-record detail),
and the figures audit_exposure.png and audit_roc.png. Trained twins and computed losses are kept,
so an interrupted audit resumes.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dpnb.auditing.attacks import (
    Groups,
    audit_ceiling,
    canaries_to_certify,
    canary_attack,
    group_privacy,
    membership_scores,
    model_losses,
    roc_summary,
    synthetic_attack,
)
from dpnb.auditing.canaries import make_canaries, with_canaries
from dpnb.config import AuditConfig, FinetuneConfig, GenerateConfig, build
from dpnb.data.prepared import load_prepared, train_sha256
from dpnb.data.prompts import PromptFormat
from dpnb.errors import DpnbError
from dpnb.generation.dataset_card import Provenance
from dpnb.generation.sampling import load_synthetic, model_fingerprint, sample_labelled
from dpnb.io import cached, read_json, save_figure, to_json, write_json_atomic
from dpnb.lessons import roc_region
from dpnb.models import load_base_model, load_tokenizer, load_trained, resolve_device
from dpnb.runconfig import to_dict
from dpnb.training import loop

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from dpnb.rundir import RunDir

STAGE = "audit"
TWINS = ("dp", "nodp")  # the twin trained with the run's DP settings, and the same without DP
# ROC points and per-record arrays: kept in each twin's details file, left out of the stage's audit.json
BULKY = ("curve", "per_canary", "scores", "canary_scores")
# a group claim (canaries repeated) this many times above the audit's ceiling is called vacuous
VACUOUS_GROUP_RATIO = 2.0
MAX_CANARIES_REPORTED = 1_000_000  # canary counts to certify a claim are searched up to this


# =========================================================================== the plan: who is in, who is out


@dataclasses.dataclass
class AuditPlan:
    """Everything both twins share: the canaries and their coins, and the membership-attack samples.

    Drawn once from the seed, before any training, so the guesses can depend only on the models.
    """

    canaries: list[dict[str, Any]]  # m canaries, each with its `inserted` coin
    references: list[dict[str, Any]]  # never inserted, drawn like the canaries: exposure ranks
    members: list[int]  # indices into the prepared train split (membership attack)
    non_members: list[int]  # indices into the prepared test split, disjoint from canary prefixes
    prefix_reuse: bool  # too few held-out reviews: some canaries share a prefix

    @property
    def inserted(self) -> np.ndarray:
        return np.array([c["inserted"] for c in self.canaries], dtype=bool)

    def canaries_sha256(self) -> str:
        records = [*self.canaries, *self.references]
        return train_sha256({"label": [int(c.get("inserted", False)) for c in records],
                             "input_ids": [c["input_ids"] for c in records]})


def plan_audit(train: datasets.Dataset, test: datasets.Dataset, label_names: Sequence[str],
               tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat, max_length: int,
               cfg: AuditConfig) -> AuditPlan:
    """Draw the membership-attack samples, the canaries (with their coins) and the references.

    Held-out reviews serve twice, never both ways at once: the first ones (in a seeded shuffle) are
    the membership attack's non-members, the rest lend their openings to canaries and references,
    which are then part of the training set for inserted canaries. With fewer of those reviews than
    canaries + references, openings are reused (drawn with replacement); validity is unaffected
    (the guarantee is about the coins), only the attack's power.
    """
    rng = np.random.default_rng(cfg.seed)
    n_mia = min(cfg.n_mia, len(train), len(test) // 2)
    if n_mia < 1 or len(test) - n_mia < 1:
        raise DpnbError(f"the prepared test split has {len(test)} records: the audit needs at least 2 "
                        f"(non-members and canary openings); raise prepare.n_test")
    test_order = rng.permutation(len(test))
    non_members = sorted(int(i) for i in test_order[:n_mia])
    members = sorted(int(i) for i in rng.choice(len(train), size=n_mia, replace=False))
    pool = test_order[n_mia:]
    n_total = cfg.n_canaries + cfg.n_reference
    reuse = len(pool) < n_total
    chosen = rng.choice(pool, size=n_total, replace=reuse)
    sources = test.select(chosen.tolist())
    records = make_canaries(list(zip(sources["text"], sources["label"], strict=True)), label_names, tokenizer,
                            prompt_format, max_length, prefix_tokens=cfg.canary_prefix_tokens,
                            suffix_tokens=cfg.canary_suffix_tokens, rng=rng)
    for record, source in zip(records, chosen, strict=True):
        record["test_index"] = int(source)  # the held-out review that lent its opening
    coins = rng.random(cfg.n_canaries) < 0.5  # independent fair coins, as the one-run theorem requires
    canaries = [{**c, "inserted": bool(coin)} for c, coin in zip(records[: cfg.n_canaries], coins, strict=True)]
    references = records[cfg.n_canaries:]
    return AuditPlan(canaries, references, members, non_members, reuse)


def plan_sequences(plan: AuditPlan, train: datasets.Dataset, test: datasets.Dataset) -> Groups:
    """Each group of records the attacks score, with the token span whose loss is its score.

    Canaries and references: their random words. Members and non-members: the review after the
    prompt (EOS included), the part of a record that is private.
    """
    def reviews(split: datasets.Dataset, indices: list[int]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        rows = split.select(indices)
        ids = [list(r) for r in rows["input_ids"]]
        return ids, [(int(p), len(r)) for p, r in zip(rows["prompt_length"], ids, strict=True)]

    def canaries(records: list[dict[str, Any]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        return [c["input_ids"] for c in records], [(c["suffix_start"], c["suffix_end"]) for c in records]

    return {"canaries": canaries(plan.canaries), "references": canaries(plan.references),
            "members": reviews(train, plan.members), "non_members": reviews(test, plan.non_members)}


def cached_losses(path: Path, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Losses saved at `path` for the same `key` (plan and model identity), else computed and saved."""
    return cached(path, key, compute, encode=lambda losses: {name: v.tolist() for name, v in losses.items()},
                  decode=lambda saved: {name: np.asarray(v, dtype=float) for name, v in saved.items()})


# =========================================================================== the twins


def twin_plan_size(n_train: int, cfg: AuditConfig) -> int:
    """The N the twins are planned for: every canary inserted, `canary_repeats` times. It depends on no coin."""
    return n_train + cfg.canary_repeats * cfg.n_canaries


def twin_configs(finetune_cfg: FinetuneConfig) -> dict[str, FinetuneConfig]:
    """The DP twin (the run's DP settings) and its non-DP twin (the same loop, no clipping or noise)."""
    return {"dp": dataclasses.replace(finetune_cfg, dp=True), "nodp": dataclasses.replace(finetune_cfg, dp=False)}


def train_twin(model_name: str, train: datasets.Dataset, train_hash: str, finetune_cfg: FinetuneConfig,
               twin_dir: Path, tokenizer: PreTrainedTokenizerBase, verbose: bool = True,
               plan_size: int | None = None) -> dict[str, Any]:
    """Fine-tune one twin with `loop.train`, exactly as stage 02 does; returns its privacy record.

    `plan_size` (`twin_plan_size`) is the N its q, steps, delta, sigma and divisor are planned for.
    `loop.train` itself returns a finished result of the same training, and resumes its own
    checkpoint. A twin directory left by other inputs (an interrupted audit with another config or
    other canaries, named by `inputs.json`) is cleared first: it is unfinished work, not a result.
    """
    inputs = {"model": model_name, "finetune": to_dict(finetune_cfg), "train_sha256": train_hash,
              "n_records": len(train), "plan_size": plan_size}
    inputs_path = twin_dir / "inputs.json"
    if twin_dir.exists() and (not inputs_path.exists() or read_json(inputs_path) != json.loads(to_json(inputs))):
        shutil.rmtree(twin_dir)
    write_json_atomic(inputs_path, inputs)
    return loop.train(model_name, train, finetune_cfg, twin_dir, train_sha256=train_hash, tokenizer=tokenizer,
                      verbose=verbose, plan_size=plan_size)


def claimed_guarantee(privacy: dict[str, Any], repeats: int) -> dict[str, Any] | None:
    """The (eps, delta) the accountant claims for one canary (a group of `repeats` records), or None."""
    if not privacy.get("dp") or privacy.get("epsilon") is None:
        return None
    epsilon, delta = group_privacy(float(privacy["epsilon"]), float(privacy["delta"]), repeats)
    return {"epsilon": epsilon, "delta": delta, "group_size": repeats,
            "record_epsilon": float(privacy["epsilon"]), "record_delta": float(privacy["delta"])}


def judge(claim: dict[str, Any] | None, one_run: dict[str, Any], group_size: int) -> dict[str, Any]:
    """Claim, lower bound and ceiling of one twin, with a verdict in words that says only what they show.

    `status` is one of
    - "no_claim": trained without DP (epsilon = infinity); the bound, at delta 0, measures leakage
      and is compared with nothing;
    - "vacuous": no outcome of the audit can give a positive bound (ceiling 0; e.g. a group delta
      clamped at 1), or a group claim (repeated canaries) is VACUOUS_GROUP_RATIO times the ceiling
      or more;
    - "out_of_reach": ceiling <= claimed epsilon: the bound cannot exceed the claim, whatever the
      model does, so `check_lower_bound` cannot fire;
    - "within_reach": ceiling > claimed epsilon: the bound could have exceeded the claim.
    `canaries_to_certify` is the fewest canaries whose ceiling at delta 0 reaches the claimed epsilon
    (a positive delta only raises it), None past MAX_CANARIES_REPORTED or without a claim.
    """
    bound, ceiling = float(one_run["epsilon_lower_bound"]), float(one_run["ceiling"])
    confidence, m = float(one_run["confidence"]), int(one_run["n_canaries"])
    out: dict[str, Any] = {
        "claim_epsilon": None if claim is None else claim["epsilon"],  # None: no claim (epsilon = infinity)
        "claim_delta": None if claim is None else claim["delta"],
        "group_size": group_size,
        "audit_delta": float(one_run["delta"]),
        "confidence": confidence,
        "n_canaries": m,
        "lower_bound": bound,
        "ceiling": ceiling,
        "canaries_to_certify": None,
        "safeguard_can_fire": False,
    }
    measured = (f"{one_run['n_correct']}/{one_run['n_guesses']} guesses right: epsilon >= {bound:.3f} at "
                f"{confidence:.0%} confidence, delta {one_run['delta']:.3g}; ceiling {ceiling:.3f} with {m} canaries")
    if claim is None:
        out["status"] = "no_claim"
        out["verdict"] = (f"no claim (trained without DP, epsilon = infinity): {measured}. The bound only "
                          f"measures how much this model leaks to this attack; it is compared with nothing.")
        return out
    epsilon, delta = float(claim["epsilon"]), float(claim["delta"])
    needed = canaries_to_certify(epsilon, confidence=confidence, max_canaries=MAX_CANARIES_REPORTED)
    out["canaries_to_certify"] = needed
    out["safeguard_can_fire"] = ceiling > epsilon
    what = (f"claim epsilon {epsilon:.3g}, delta {delta:.3g}" if group_size == 1 else
            f"group claim for a canary inserted {group_size} times: epsilon {epsilon:.3g}, delta {delta:.3g} "
            f"(from {claim['record_epsilon']:.3g}, {claim['record_delta']:.3g} per record)")
    need = (f"certifying epsilon {epsilon:.3g} would need at least {needed:,} canaries (that many at delta 0; "
            f"a positive delta needs more)" if needed is not None
            else f"certifying epsilon {epsilon:.3g} would need more than {MAX_CANARIES_REPORTED:,} canaries")
    if delta >= 1 or ceiling <= 0:
        why = "its delta is 1, so it promises nothing" if delta >= 1 else "its delta is too large for this test"
        out["status"] = "vacuous"
        out["verdict"] = (f"vacuous: {what}; {why}: no outcome of the audit can give a bound above 0 "
                          f"(ceiling {ceiling:.3g}), whatever the model does. {measured}." +
                          (" Insert canaries once (audit.canary_repeats = 1) to test the per-record claim."
                           if group_size > 1 else ""))
    elif group_size > 1 and epsilon >= VACUOUS_GROUP_RATIO * ceiling:
        out["status"] = "vacuous"
        out["verdict"] = (f"vacuous: {what}, at least {VACUOUS_GROUP_RATIO:g} times the ceiling {ceiling:.3f}: "
                          f"this audit cannot test it. {measured}. Insert canaries once "
                          f"(audit.canary_repeats = 1) to test the per-record claim.")
    elif ceiling <= epsilon:
        out["status"] = "out_of_reach"
        out["verdict"] = (f"ceiling below the claim: this audit cannot test the claim ({what}); it can only "
                          f"show leakage up to epsilon {ceiling:.3f}, so the safeguard cannot fire; {need}. "
                          f"{measured}.")
    else:
        exceeded = "exceeded it: the claim is wrong" if bound > epsilon + 1e-9 else "did not exceed it"
        out["status"] = "within_reach"
        out["verdict"] = (f"claim within reach ({what}; ceiling {ceiling:.3f}): the bound {bound:.3f} {exceeded}. "
                          f"{measured}.")
    return out


def check_lower_bound(result: dict[str, Any], details_path: Path) -> None:
    """Stop when the audit proves more leakage than the accountant allows: the package has a bug.

    It can fire only when the audit's ceiling is above the claimed epsilon (`judge` records whether).
    """
    claim = result.get("claim")
    if claim is None:
        return
    one_run = result["canaries"]["one_run"]
    bound = one_run["epsilon_lower_bound"]
    if bound > claim["epsilon"] + 1e-9:
        raise DpnbError(
            f"privacy audit failed: {one_run['n_correct']} of {one_run['n_guesses']} membership guesses were "
            f"right, which rules out epsilon = {bound:.3f} at {one_run['confidence']:.0%} confidence, above the "
            f"claimed epsilon {claim['epsilon']:.3f} (delta {claim['delta']:.3g}); the accounting or DP-SGD "
            f"is wrong (details: {details_path}); do not release this model's outputs, and rerun the audit with "
            f"another audit.seed (chance alone does this with probability under {1 - one_run['confidence']:.0%})"
        )


def audit_twin(name: str, tokenizer: PreTrainedTokenizerBase, privacy: dict[str, Any],
               losses: dict[str, np.ndarray], base: dict[str, np.ndarray], plan: AuditPlan, *,
               cfg: AuditConfig, synthetic_texts: Sequence[str] | None) -> dict[str, Any]:
    """Every attack on one trained twin, from its losses and the base model's.

    Each twin is judged against its own claim: the DP twin's one-run bound is computed at its
    claim's delta, the non-DP twin's (no claim) at delta 0.
    """
    inserted = plan.inserted
    scores = membership_scores(losses["canaries"], base["canaries"], cfg.score)
    reference_scores = membership_scores(losses["references"], base["references"], cfg.score)
    claim = claimed_guarantee(privacy, cfg.canary_repeats)
    delta = 0.0 if claim is None else float(claim["delta"])
    canaries = canary_attack(scores, reference_scores, inserted, n_guesses=cfg.n_guesses,
                             confidence=cfg.confidence, delta=delta, seed=cfg.seed)
    result: dict[str, Any] = {
        "twin": name,
        "privacy": {k: privacy.get(k) for k in ("dp", "epsilon", "delta", "accountant", "noise_multiplier",
                                                "sample_rate", "steps", "dataset_size", "planned_dataset_size",
                                                "divisor")},
        "claim": claim,
        "audit_delta": delta,
        "judgement": judge(claim, canaries["one_run"], cfg.canary_repeats),
        "canaries": canaries,
        "canary_scores": scores.tolist(),
        "mia": {
            "loss": roc_summary(-losses["members"], -losses["non_members"]),
            "calibrated": roc_summary(base["members"] - losses["members"],
                                      base["non_members"] - losses["non_members"]),
        },
        "synthetic": None,
    }
    if synthetic_texts is not None:
        result["synthetic"] = synthetic_attack(synthetic_texts, plan.canaries, inserted, tokenizer,
                                               order=cfg.ngram_order, smoothing=cfg.ngram_smoothing)
    return result


def without_bulk(result: Any) -> Any:
    """A result without its ROC points and per-record arrays, for the stage's compact audit.json."""
    if isinstance(result, dict):
        return {k: without_bulk(v) for k, v in result.items() if k not in BULKY}
    return result


# =========================================================================== the stage


def audit_finetune_config(run: RunDir, cfg: AuditConfig) -> FinetuneConfig:
    """The run's completed fine-tuning config (stages/finetune.json), with audit.finetune_overrides."""
    run.require_stage("finetune")
    saved = run.completed_config("finetune") or {}
    finetune_cfg = build(FinetuneConfig, {**saved, **cfg.finetune_overrides}, "finetune config of the audit twins")
    twin_configs(finetune_cfg)  # the DP twin's config is checked too (a run trained without DP may use bf16 weights)
    return finetune_cfg


def synthetic_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat,
                    label_names: Sequence[str], privacy: dict[str, Any], model_name: str, cfg: AuditConfig,
                    out_dir: Path) -> list[str]:
    """Text sampled from a twin with `sampling.sample_labelled`: the data an attacker would be given."""
    gen_cfg = GenerateConfig(n_per_label=cfg.synthetic_per_label, max_new_tokens=cfg.synthetic_max_new_tokens,
                             batch_size=min(32, cfg.synthetic_per_label), zero_shot=False, device=cfg.device,
                             seed=cfg.seed)
    kind = "dp" if privacy.get("dp") else "non_dp"
    provenance = Provenance(kind, model_name, data="the private training set plus audit canaries",
                            privacy=privacy if kind == "dp" else None)
    sample_labelled(model, tokenizer, prompt_format, label_names, gen_cfg, out_dir, provenance=provenance,
                    overwrite=True, progress=False)
    return list(load_synthetic(out_dir)["text"])


def run_audit(model_name: str, train: datasets.Dataset, test: datasets.Dataset, manifest: dict[str, Any],
              finetune_cfg: FinetuneConfig, cfg: AuditConfig, out_dir: Path) -> dict[str, Any]:
    """Plan the canaries, train both twins on train + inserted canaries, attack them; return the summary.

    Writes into `out_dir`: canaries.json (every canary, its coin and the references), base_losses.json,
    and per twin `<twin>/` (the finetune outputs, losses.json, synthetic/, audit.json with the
    details). Stops with an error as soon as the DP twin's lower bound exceeds its accounted epsilon.
    """
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(model_name)
    prompt_format = PromptFormat.from_dict(manifest["prompt"])
    label_names = list(manifest["label_names"])
    plan = plan_audit(train, test, label_names, tokenizer, prompt_format, int(manifest["max_length"]), cfg)
    write_json_atomic(out_dir / "canaries.json", dataclasses.asdict(plan))
    augmented = with_canaries(train, plan.canaries, plan.inserted, cfg.canary_repeats)
    train_hash = train_sha256({"label": augmented["label"], "input_ids": augmented["input_ids"]})
    groups = plan_sequences(plan, train, test)
    device = resolve_device(cfg.device)
    plan_key = f"{plan.canaries_sha256()}:{manifest.get('train_sha256')}:{plan.members}:{plan.non_members}"

    def base_losses() -> dict[str, np.ndarray]:
        # the weights the twins started from, as `load_trained` rebuilds them (a QLoRA base dequantised off the GPU)
        base_model = load_base_model(model_name, mode=finetune_cfg.mode, dtype=finetune_cfg.dtype, device=device,
                                     seed=finetune_cfg.seed)
        try:
            return model_losses(base_model, groups, batch_size=cfg.batch_size, device=device)
        finally:
            del base_model
            gc.collect()

    base_key = f"{plan_key}:{model_name}:{finetune_cfg.mode}:{finetune_cfg.dtype}:{finetune_cfg.seed}"
    base = cached_losses(out_dir / "base_losses.json", base_key, base_losses)
    results: dict[str, dict[str, Any]] = {}
    for name, twin_cfg in twin_configs(finetune_cfg).items():
        twin_dir = out_dir / name
        privacy = train_twin(model_name, augmented, train_hash, twin_cfg, twin_dir, tokenizer,
                             plan_size=twin_plan_size(len(train), cfg))
        model, _ = load_trained(twin_dir / "model", device=device)
        losses = cached_losses(twin_dir / "losses.json", f"{plan_key}:{model_fingerprint(model)}",
                               lambda m=model: model_losses(m, groups, batch_size=cfg.batch_size, device=device))
        texts = None
        if cfg.synthetic_per_label > 0:
            texts = synthetic_texts(model, tokenizer, prompt_format, label_names, privacy, model_name, cfg,
                                    twin_dir / "synthetic")
        result = audit_twin(name, tokenizer, privacy, losses, base, plan, cfg=cfg, synthetic_texts=texts)
        write_json_atomic(twin_dir / "audit.json", result)
        check_lower_bound(result, twin_dir / "audit.json")
        results[name] = result
        del model
        gc.collect()
    inserted = plan.inserted
    return {
        "model": model_name,
        "n_train": len(train),
        "n_train_with_canaries": len(augmented),
        "n_train_planned": twin_plan_size(len(train), cfg),  # the twins' plan: every canary inserted
        "canaries": {
            "n_canaries": len(plan.canaries), "n_inserted": int(inserted.sum()), "repeats": cfg.canary_repeats,
            "prefix_tokens": cfg.canary_prefix_tokens, "suffix_tokens": cfg.canary_suffix_tokens,
            "n_reference": len(plan.references), "prefix_reuse": plan.prefix_reuse, "score": cfg.score,
        },
        "membership": {"n_members": len(plan.members), "n_non_members": len(plan.non_members)},
        "finetune": dataclasses.asdict(finetune_cfg),
        "twins": {name: without_bulk(result) for name, result in results.items()},
    }


def run_stage(run: RunDir, cfg: AuditConfig, force: bool = False) -> dict[str, Any]:
    """06 audit: train the DP and non-DP twins on train + canaries, attack them, write audit.json.

    Needs prepare and finetune complete (the twins use the run's fine-tuning config). Skips when
    done with this config, refuses a different one unless `force`, reuses trained twins and saved
    losses when interrupted, and writes the completion marker last. Returns audit.json's contents.
    """
    run.require_stage("prepare")
    run.require_stage("finetune")
    if not run.should_run(STAGE, cfg, force):
        return read_json(run.audit)
    started = time.time()
    train, test, manifest = load_prepared(run)
    finetune_cfg = audit_finetune_config(run, cfg)
    summary = run_audit(manifest["model"], train, test, manifest, finetune_cfg, cfg, run.audit_dir)
    write_json_atomic(run.audit, summary)
    write_figures(run)
    run.mark_complete(STAGE, cfg, started)
    return read_json(run.audit)  # the same values a skipped run returns


def load_details(run: RunDir) -> dict[str, dict[str, Any]]:
    """Each twin's full results (ROC points, per-canary scores and exposures), for plots."""
    return {name: read_json(run.twin(name).audit) for name in TWINS if run.twin(name).audit.exists()}


def load_canaries(run: RunDir) -> dict[str, Any]:
    """The audit plan as saved: every canary with its coin, the references and the membership samples."""
    return read_json(run.audit_dir / "canaries.json")


def write_figures(run: RunDir) -> None:
    """The stage's figures, from its saved details: audit_exposure.png and audit_roc.png."""
    details = load_details(run)
    save_figure(plot_exposure(details, load_canaries(run)), run.figure("audit_exposure.png"))
    save_figure(plot_roc_curves(details), run.figure("audit_roc.png"))


# =========================================================================== tables and figures


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per twin: the claim, the one-run bound and its ceiling, the verdict, and what each attack found."""
    rows = {}
    for name, twin in summary["twins"].items():
        one_run, pure = twin["canaries"]["one_run"], twin["canaries"]["one_run_pure"]
        judgement = twin["judgement"]
        claim_epsilon = judgement["claim_epsilon"]
        exposure_in = twin["canaries"]["exposure"]["inserted"]
        exposure_out = twin["canaries"]["exposure"]["not_inserted"]
        synthetic = (twin.get("synthetic") or {}).get("roc")
        canary_roc = twin["canaries"].get("roc")
        rows[name] = {
            "accountant epsilon": None if twin["privacy"]["epsilon"] is None else round(twin["privacy"]["epsilon"], 3),
            "claimed epsilon (per canary)": "infinity (no DP)" if claim_epsilon is None else round(claim_epsilon, 3),
            "group size": judgement["group_size"],
            "audit delta": float(f"{one_run['delta']:.3g}"),
            "audit epsilon lower bound": round(one_run["epsilon_lower_bound"], 3),
            "ceiling (every guess right)": round(judgement["ceiling"], 3),
            "verdict": judgement["status"].replace("_", " "),
            "correct guesses": f"{one_run['n_correct']}/{one_run['n_guesses']}",
            "lower bound for pure DP (delta 0)": round(pure["epsilon_lower_bound"], 3),
            "exposure, inserted (mean bits)": round(exposure_in["mean"], 2) if exposure_in else None,
            "exposure, not inserted (mean bits)": round(exposure_out["mean"], 2) if exposure_out else None,
            "canary AUC": round(canary_roc["auc"], 3) if canary_roc else None,
            "synthetic-data AUC": round(synthetic["auc"], 3) if synthetic else None,
            "MIA AUC (loss)": round(twin["mia"]["loss"]["auc"], 3),
            "MIA TPR @ 1% FPR": round(twin["mia"]["loss"]["tpr_at_fpr"]["0.01"], 3),
            "MIA TPR @ 0.1% FPR": round(twin["mia"]["loss"]["tpr_at_fpr"]["0.001"], 3),
        }
    return pd.DataFrame(rows)


def ceiling_table(n_canaries: Sequence[int], confidence: float, claim: dict[str, Any] | None = None) -> pd.DataFrame:
    """The audit's ceiling (its bound with every guess right) for several canary counts.

    At delta 0, and at the delta of `claim` (the DP twin's) when given: a delta > 0 lowers it.
    """
    rows = {}
    for m in sorted(set(n_canaries)):
        row = {"ceiling (delta 0)": round(audit_ceiling(m, confidence=confidence), 3)}
        if claim is not None:
            row[f"ceiling (delta {claim['delta']:.3g})"] = round(
                audit_ceiling(m, confidence=confidence, delta=float(claim["delta"])), 3)
        rows[m] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("canaries")


ROC_FLOOR = 1e-3  # the log axes' lower end: rates below it (0 included) are drawn on it


def roc_line(curve: dict[str, list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve through sklearn's points, joined by straight lines, densified to draw on log axes.

    Between two points the records of one tied score are crossed in a random order: the rates move
    together along the straight line (what the AUC counts), not as a step. Each segment is sampled at
    FPRs spaced evenly on a log scale, so that it keeps its shape on the figure's log axes.
    """
    fpr, tpr = np.asarray(curve["fpr"], dtype=float), np.asarray(curve["tpr"], dtype=float)
    xs, ys = [fpr[:1]], [tpr[:1]]
    for f1, t1, f2, t2 in zip(fpr[:-1], tpr[:-1], fpr[1:], tpr[1:], strict=True):
        if f2 > f1:
            f = np.geomspace(max(f1, ROC_FLOOR / 10), f2, 40)
            xs.append(f)
            ys.append(t1 + (f - f1) * (t2 - t1) / (f2 - f1))
        else:
            xs.append(np.array([f2]))
            ys.append(np.array([t2]))
    return np.concatenate(xs), np.concatenate(ys)


def largest_tie(roc: dict[str, Any]) -> float:
    """The share of all scored records that sit in the largest group of one tied score (ROC points' steps)."""
    curve = roc["curve"]
    fpr, tpr = np.diff(curve["fpr"]), np.diff(curve["tpr"])
    records = fpr * roc["n_non_members"] + tpr * roc["n_members"]
    tied = records[(fpr > 0) & (tpr > 0)]  # a step that moves both rates holds members and non-members alike
    return float(tied.max() / (roc["n_non_members"] + roc["n_members"])) if tied.size else 0.0


def draw_claim_region(ax: Axes, epsilon: float, delta: float, claimed: str) -> str | None:
    """Shade the ROC region an (epsilon, delta) claim allows every membership test (`dpnb.lessons.roc_region`).

    Returns a note instead when delta >= 1: such a claim allows every curve.
    """
    if delta >= 1:
        return f"{claimed} has delta >= 1: it allows any curve"
    fpr = np.geomspace(ROC_FLOOR, 1, 400)
    lower, upper = roc_region(fpr, epsilon, delta)
    ax.fill_between(fpr, np.maximum(lower, ROC_FLOOR), upper, color="tab:green", alpha=0.12, linewidth=0,
                    label=f"allowed by {claimed} (eps {epsilon:.3g}, delta {delta:.2g})")
    ax.plot(fpr, upper, color="tab:green", linewidth=0.8)
    return None


def plot_roc_curves(details: dict[str, dict[str, Any]]) -> Figure:
    """ROC curves (log-log, where low-FPR leakage shows) of the three attacks, both twins per panel.

    Each panel shades the region the DP twin's claim allows: the group claim (a canary inserted
    `canary_repeats` times) on the canary panels, the per-record claim on the real reviews. Curves
    join sklearn's points by straight lines (`roc_line`); a dashed line marks one non-member's worth
    of FPR (left of it nothing is measured); a note says when most of a twin's records share one score
    (`largest_tie`): such an attack ranks nothing, whatever its curve looks like.
    """
    def canary_claim(claim: dict[str, Any]) -> tuple[float, float, str]:
        group = claim["group_size"]
        return claim["epsilon"], claim["delta"], "dp's claim" if group == 1 else f"dp's claim for {group} copies"

    def record_claim(claim: dict[str, Any]) -> tuple[float, float, str]:
        return claim["record_epsilon"], claim["record_delta"], "dp's claim per record"

    panels = [("canary scores (model access)", lambda d: d["canaries"].get("roc"), canary_claim),
              ("canaries from synthetic text only", lambda d: (d.get("synthetic") or {}).get("roc"), canary_claim),
              ("real reviews: loss attack", lambda d: d["mia"]["loss"], record_claim)]
    claim = (details.get("dp") or {}).get("claim")
    figure = Figure(figsize=(13, 4.4), layout="constrained")
    axes = figure.subplots(1, len(panels))
    for ax, (title, roc_of, claim_of) in zip(axes, panels, strict=True):
        note = draw_claim_region(ax, *claim_of(claim)) if claim is not None else None
        notes = [note] if note else []
        ax.plot([ROC_FLOOR, 1], [ROC_FLOOR, 1], color="grey", linestyle=":", label="chance")
        rocs = {name: roc for name, twin in details.items() if (roc := roc_of(twin)) is not None}
        if not rocs:
            notes.append("not run in this audit")
        for name, roc in rocs.items():
            twin = details[name]
            fpr, tpr = roc_line(roc["curve"])
            epsilon = twin["privacy"]["epsilon"]
            label = f"{name} (eps {epsilon:.2g})" if epsilon is not None else f"{name} (no DP)"
            ax.plot(np.maximum(fpr, ROC_FLOOR), np.maximum(tpr, ROC_FLOOR), label=label)
            ax.axvline(1 / roc["n_non_members"], color="grey", linestyle="--", linewidth=0.6)
            if (tie := largest_tie(roc)) >= 0.5:
                n = roc["n_members"] + roc["n_non_members"]
                notes.append(f"{name}: all {n} scores tied, a coin toss" if tie == 1 else
                             f"{name}: {tie:.0%} of {n} scores tied")
        if notes:
            ax.text(0.03, 0.97, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=8)
        ax.set(xscale="log", yscale="log", xlim=(ROC_FLOOR, 1), ylim=(ROC_FLOOR, 1.05), title=title,
               xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(loc="lower right", fontsize=8)
    return figure


def plot_exposure(details: dict[str, dict[str, Any]], canaries: dict[str, Any]) -> Figure:
    """Histograms of canary exposure, inserted vs not inserted, one panel per twin."""
    inserted = np.array([c["inserted"] for c in canaries["canaries"]], dtype=bool)
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(details), sharey=True))
    for ax, (name, twin) in zip(axes, details.items(), strict=True):
        values = np.asarray(twin["canaries"]["per_canary"]["exposure"])
        top = twin["canaries"]["exposure"]["max_measurable"]
        bins = np.linspace(0, top, 25)
        ax.hist(values[~inserted], bins=bins, alpha=0.6, label="not inserted")
        ax.hist(values[inserted], bins=bins, alpha=0.6, label="inserted")
        ax.axvline(1 / math.log(2), color="grey", linestyle=":", label="unseen mean (1.44 bits)")
        ax.set(title=f"{name}: exposure", xlabel="exposure (bits)", ylabel="canaries")
        ax.legend()
    return figure
