"""The memorisation screen against brute force, and the generator tokens it screens."""

from __future__ import annotations

import numpy as np
import pytest

from dpnb.errors import DpnbError
from dpnb.evaluation import memorisation


def test_review_token_ids_drop_the_prompt_and_the_final_eos():
    from datasets import Dataset

    eos = 2
    records = Dataset.from_dict({"input_ids": [[7, 8, 30, 31, eos], [9, 40, 41], [7, 8, 50, eos]],
                                 "prompt_length": [2, 1, 2]})
    reviews = memorisation.review_token_ids(records, eos)
    assert [r.tolist() for r in reviews] == [[30, 31], [40, 41], [50]]  # the second was cut: no EOS
    assert [r.tolist() for r in memorisation.review_token_ids(records.select([2, 0]), eos)] == [[50], [30, 31]]


# --------------------------------------------------------------------------- memorisation screen


def brute_force_longest_shared(reference: list[list[int]], query: list[int]) -> int:
    """Longest common substring of `query` with any reference, by dynamic programming."""
    best = 0
    for ref in reference:
        previous = [0] * (len(ref) + 1)
        for token in query:
            current = [0] * (len(ref) + 1)
            for j, other in enumerate(ref):
                if token == other:
                    current[j + 1] = previous[j] + 1
                    best = max(best, current[j + 1])
            previous = current
    return best


def test_screen_finds_a_planted_copy_with_its_length_and_row():
    rng = np.random.default_rng(0)
    reference = [rng.integers(0, 49_152, rng.integers(80, 200)).tolist() for _ in range(40)]
    queries = [rng.integers(0, 49_152, rng.integers(20, 120)).tolist() for _ in range(30)]
    copied = reference[13][20:77]  # 57 tokens
    queries[4] = [1, 2, 3, 4, 5, 6, 7, 8, 9] + copied + [10, 11, 12]
    # the tokens around the copy differ from those around it in the reference, so it cannot extend
    assert reference[13][19] != 9 and reference[13][77] != 10
    runs = memorisation.longest_shared_runs(reference, queries)
    assert runs.length[4] == 57
    assert (runs.reference_row[4], runs.reference_offset[4], runs.query_offset[4]) == (13, 20, 9)
    others = np.delete(runs.length, 4)
    assert others.max() < 5  # random 16-bit tokens share at most a couple by chance

    summary = memorisation.memorisation_summary(runs, threshold=50)
    assert summary["max"] == 57 and summary["n_flagged"] == 1
    assert "flagged" not in summary  # positions of training records are not in the shareable figures
    assert memorisation.flagged_samples(runs, threshold=50) == [{"sample": 4, "length": 57, "train_row": 13,
                                                                 "train_offset": 20, "sample_offset": 9}]
    assert sum(summary["counts"]) == len(queries) and summary["counts"][57] == 1


@pytest.mark.parametrize("alphabet", [1, 2, 3, 7, 10**9])
def test_screen_agrees_with_brute_force(alphabet):
    rng = np.random.default_rng(alphabet)
    for _ in range(40):
        reference = [rng.integers(0, alphabet, rng.integers(0, 25)).tolist() for _ in range(rng.integers(1, 6))]
        queries = [rng.integers(0, alphabet, rng.integers(0, 25)).tolist() for _ in range(rng.integers(1, 6))]
        if reference[0] and queries[0]:  # often plant part of a reference text, to get long runs too
            queries[0] = queries[0][:3] + reference[0][2:20] + queries[0][3:]
        runs = memorisation.longest_shared_runs(reference, queries)
        for q, query in enumerate(queries):
            length = int(runs.length[q])
            assert length == brute_force_longest_shared(reference, query)
            if length:
                row, ref_at, query_at = runs.reference_row[q], runs.reference_offset[q], runs.query_offset[q]
                assert reference[row][ref_at : ref_at + length] == query[query_at : query_at + length]
            else:
                assert runs.reference_row[q] == -1


def test_screen_edge_cases():
    assert memorisation.longest_shared_runs([[1, 2]], []).length.tolist() == []
    assert memorisation.longest_shared_runs([[]], [[1, 2]]).length.tolist() == [0]
    runs = memorisation.longest_shared_runs([[5, 6, 7], [6, 7, 8, 9]], [[], [6, 7, 8], [7]])
    assert runs.length.tolist() == [0, 3, 1]
    assert runs.reference_row[1] == 1
    with pytest.raises(DpnbError, match="non-negative"):
        memorisation.longest_shared_runs([[1, -3]], [[1]])
