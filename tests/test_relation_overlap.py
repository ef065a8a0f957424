"""The helpers of benchmarks/relation_overlap.py: rank correlation with ties, and recovering a filled-in subject."""

from __future__ import annotations

import math

import pytest

from benchmarks.relation_overlap import spearman, subject_of


def test_spearman_is_one_for_monotone_and_minus_one_for_reversed():
    assert spearman([1.0, 2.0, 5.0, 9.0], [0.1, 0.2, 0.3, 7.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 5.0, 9.0], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_spearman_gives_ties_their_average_rank():
    # x ranks (0.5, 0.5, 2), y ranks (0, 1, 2): centred dot 1.5 over norms √1.5 · √2
    assert spearman([1.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == pytest.approx(1.5 / math.sqrt(3.0))


def test_subject_of_recovers_the_filled_in_subject():
    assert subject_of("The capital of Kenya is", "The capital of {} is") == "Kenya"
    assert subject_of("Rio de Janeiro is a city in the country of", "{} is a city in the country of") == "Rio de Janeiro"
    with pytest.raises(ValueError, match="is not"):
        subject_of("The capital of Kenya was", "The capital of {} is")
