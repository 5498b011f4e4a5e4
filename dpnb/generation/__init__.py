"""Synthetic text: label-prompted sampling, its engines, the dataset card and Private Evolution.

`sampling` (sharded, resumable sampling and post-processing), `engines` (one interface over the
sampling engines), `next_token` (the sampling settings and each step's token), `decoding` and
`fast_forward` (the fast sampler and its forward pass), `vllm_engine` (the optional GPU engine),
`dataset_card` (the card that states a set's guarantee), `evolution` (the Private Evolution
mechanism). The generate stage (`dpnb.stages.generate`) runs them.
"""
