"""Tests of the shared argument checks."""

import pytest

from lora_lens.checks import check_fraction, check_positive
from lora_lens.errors import ConfigError


def test_check_positive():
    check_positive("n", 1)
    for bad in (0, -1, 1.0, True, "2"):
        with pytest.raises(ConfigError, match="n=.* must be a positive integer"):
            check_positive("n", bad)


def test_check_fraction():
    assert check_fraction("min_confidence", 0, 0.1) == 0.0 and check_fraction("x", 0.5, 0.1) == 0.5
    for bad in (1, 1.0, -0.1, True, "0.5"):
        with pytest.raises(ConfigError, match=r"must be a number in \[0, 1\), e.g. 0.1"):
            check_fraction("min_confidence", bad, 0.1)
