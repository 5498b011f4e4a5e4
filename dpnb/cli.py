"""`dpnb`: run the pipeline's notebooks headlessly, sweep parameters, and report.

    dpnb run CONFIG [--force] [--stages prepare,finetune] [--set finetune.target_epsilon=3]
    dpnb sweep SWEEP_CONFIG [--jobs N] [--force] [--print-commands]
    dpnb report [RUNS_DIR]
    dpnb verify RUN_DIR          recompute the run's epsilon from privacy.json with Opacus
    dpnb models                  list the model presets

`run` executes notebooks 01-04 (and 06 when `audit` is among the stages) with papermill into the run
directory, keeping every executed notebook there (`dpnb.pipeline`). A stage whose outputs are
complete is skipped; a stage that runs makes every later stage run too (its inputs changed); a
failed stage stops the run with its executed notebook kept, and the next `dpnb run` resumes from it.
`sweep` runs many configs (`dpnb.sweep`). This module holds only the command line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from dpnb import models, registry
from dpnb.errors import DpnbError, require
from dpnb.io import read_json
from dpnb.pipeline import refresh_notebooks, run_pipeline, run_report
from dpnb.privacy import guarantee, independent_accounting
from dpnb.rundir import RunDir
from dpnb.sweep import run_sweep, sweep_commands
from dpnb.training.distributed import launched_by_torchrun


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs (dotted keys) with YAML-typed values: `finetune.target_epsilon=3`."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise DpnbError(f"--set {pair!r} must look like section.key=value, e.g. finetune.target_epsilon=3")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def verify(run_dir: str) -> None:
    """`dpnb verify`: recompute every epsilon a run states, with two accountant libraries.

    The records: privacy.json (the fine-tuning), pe/privacy.json (the Private Evolution set) and
    dp_classifier/privacy.json (the direct DP classifier), whichever the run has. Each is recomputed
    first with Opacus (the path that wrote it: a mismatch means the file was edited or the accounting
    changed), then with Google's dp-accounting, an independent implementation (PLD and RDP): a claim
    below Google's PLD by more than the stated slack fails.
    """
    run = RunDir(run_dir)
    records = {"fine-tuning (privacy.json)": run.privacy,
               "Private Evolution (pe/privacy.json)": run.pe / "privacy.json",
               "direct DP classifier (dp_classifier/privacy.json)": run.dp_classifier / "privacy.json"}
    found = {name: path for name, path in records.items() if path.exists()}
    require(found, f"{run_dir} holds no privacy record (privacy.json); run the finetune stage first")
    for name, path in found.items():
        verify_record(f"{run_dir}: {name}", read_json(path))


def verify_record(what: str, record: dict) -> None:
    """Recompute one privacy record's epsilon with Opacus and cross-check it with Google's dp-accounting."""
    guarantee.verify_privacy(record)
    if not record.get("dp"):
        print(f"{what}: without DP; the record correctly claims no epsilon")
        return
    mechanisms = record.get("mechanisms") or [{"name": record.get("mechanism", "DP-SGD"), **record}]
    print(f"{what}: epsilon {record['epsilon']:.4f} ({record['accountant']}), delta {record['delta']:.3g}")
    for m in mechanisms:
        print(f"  {m['name']}: noise_multiplier {m['noise_multiplier']:.4f}, sample_rate {m['sample_rate']:.6g}, "
              f"steps {m['steps']}")
    print(f"  Opacus {record['accountant'].upper()} recomputed from these numbers: {record['epsilon']:.4f} (matches)")
    check = independent_accounting.cross_check(record)  # raises DpnbError beyond the slack
    print(f"  Google dp-accounting: PLD {check['google_pld']:.4f}, RDP {check['google_rdp']:.4f}; "
          f"claim minus reference {check['difference']:+.4f}, tolerance {check['tolerance']:.4f}: agrees")
    if check.get("note"):
        print(f"  note: {check['note']}")
    if not record.get("dp_release", True):
        print(f"  NOT a DP release: {record.get('release_note', 'noise drawn from the config seed')}")


def list_models() -> None:
    """`dpnb models`: one line per model preset."""
    for row in models.describe_presets():
        print(f"{row['name']:<24} {row['kind']:<10} {row['source']:<8} {row['description']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpnb", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) one experiment from a YAML config")
    p.add_argument("config")
    p.add_argument("--force", action="store_true", help="redo stages that already completed")
    p.add_argument("--stages", help=f"comma-separated subset of the stages {','.join(registry.STAGES)} to run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--verbose", action="store_true", help="stream the notebooks' output")
    p = sub.add_parser("sweep", help="run a grid of experiments")
    p.add_argument("config")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (with GPUs: one GPU per run)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--print-commands", action="store_true",
                   help="print one `dpnb run` command per run (for a cluster scheduler) instead of running them")
    p = sub.add_parser("report", help="table and figures over every run in a directory")
    p.add_argument("runs_dir", nargs="?", default="runs")
    p.add_argument("--out", help="output directory (default RUNS_DIR/report)")
    p = sub.add_parser("verify", help="recompute a run's epsilon from its privacy.json")
    p.add_argument("run_dir")
    sub.add_parser("models", help="list model presets")
    p = sub.add_parser("notebooks", help="refresh the committed notebooks' outputs from the runs they read "
                                         "(maintainers: after make demo, the sweep and the audit)")
    p.add_argument("names", nargs="*", help="notebook file names (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            stages = args.stages.split(",") if args.stages else None
            run_pipeline(args.config, parse_overrides(args.set), force=args.force, stages=stages,
                         verbose=args.verbose)
        elif args.command == "sweep":
            if args.jobs < 1:
                raise DpnbError("--jobs must be at least 1")
            if launched_by_torchrun():
                raise DpnbError("dpnb sweep starts its runs itself; run it without torchrun, and to spread one run "
                                "over several GPUs, start that run under torchrun (dpnb sweep --print-commands gives "
                                "each run's `dpnb run` command)")
            if args.print_commands:
                print("\n".join(sweep_commands(args.config, force=args.force)))
            else:
                run_sweep(args.config, jobs=args.jobs, force=args.force)
        elif args.command == "report":
            run_report(args.runs_dir, args.out)
        elif args.command == "verify":
            verify(args.run_dir)
        elif args.command == "models":
            list_models()
        elif args.command == "notebooks":
            refresh_notebooks(args.names or None)
    except DpnbError as exc:
        print(f"dpnb: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpnb: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
