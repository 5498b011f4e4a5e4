"""Is the accounted epsilon honest: planted canaries and the attacks on a trained model.

`canaries` (random-word canaries, their insertion and exposure), `attacks` (membership scores,
the one-run lower bound on epsilon and its ceiling, the attack on synthetic text). The audit stage
(`dpnb.stages.audit`) runs them.
"""
