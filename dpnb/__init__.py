"""dpnb: differentially private fine-tuning of pre-trained language models and DP synthetic text.

The pipeline's stages, one module each in `dpnb.stages` (its `run_stage` and the views its notebook
shows), over engines that each hold one concept:

    stages.prepare   labelled text -> training records     sources, prompts, textstats   (01_prepare)
    stages.finetune  DP-SGD fine-tuning with Opacus         dpsgd, prefix_cache, head_loss,
                                                            checkpoints, privacy, models (02_finetune)
    stages.generate  label-prompted synthetic text          sampling, decoding, dataset_card (03_generate)
    stages.evaluate  train on synthetic, test on real       classifier, embeddings, memorisation (04_evaluate)
    stages.report    tables and figures over many runs                                    (05_report)
    stages.audit     canaries, one-run epsilon lower bound  canaries, attacks             (06_audit)

Shared ground: `registry` (the stage list), `config` and `runconfig` (typed configs), `rundir` (the
run directory and stage completion), `io` (atomic writes, figures, the cache), `pipeline` and
`sweep` (headless runs), `notebook` (what every notebook does first), `errors`. The docs/design.md
file draws the whole picture.
"""

import warnings

# tqdm warns in every notebook that ipywidgets is missing; its plain-text bars work without it
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
