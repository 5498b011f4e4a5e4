"""dpnb: differentially private fine-tuning of pre-trained language models and DP synthetic text.

The package follows the pipeline's stages, one module each:

    data      prepare labelled text into training records       (notebooks/01_prepare.ipynb)
    finetune  DP-SGD fine-tuning with Opacus                     (notebooks/02_finetune.ipynb)
    privacy   noise calibration and privacy accounting           (used by finetune, audit, 00)
    generate  label-prompted synthetic text                      (notebooks/03_generate.ipynb)
    evaluate  train-on-synthetic / test-on-real, fidelity, memorisation (notebooks/04_evaluate.ipynb)
    report    tables and figures over many runs                  (notebooks/05_report.ipynb)
    audit     canaries, one-run epsilon lower bound, membership inference (notebooks/06_audit.ipynb)

Shared ground: `config` (one typed config per stage), `models` (presets and loading), `rundir`
(the run directory, atomic writes, stage completion), `errors` (one-line errors with a fix).
"""

import warnings

# tqdm warns in every notebook that ipywidgets is missing; its plain-text bars work without it
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
