"""DP-SGD fine-tuning: the step, its fast path for top-block training, stopping and resuming, torchrun.

`dpsgd` (records, batches, the per-record loss, the Opacus session and its logical steps),
`prefix_cache` and `head_loss` (the frozen blocks computed once per record; the frozen head's loss
at the review's tokens), `checkpoints` (the resumable state), `distributed` (one model across
processes). The finetune stage (`dpnb.stages.finetune`) and the audit's twins train through them.
"""
