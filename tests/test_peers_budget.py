"""bench/peers.py reads budgets in the project's --cache-budget syntax (bytes, a fraction, total slots) and answers
a bad one, or the retired --budgets flag, in one line with exit code 2 before any model is built."""

from __future__ import annotations

import pytest
from script_modules import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/peers.py")


def test_budgets_in_bytes_fractions_and_slots(bench):
    layers, experts, expert_bytes = 4, 64, 12_582_912  # OLMoE-1B-7B's shapes: 12.6 MB experts
    got = bench.parse_budgets("0.25, 25%,1GiB,96,1.0,1TB", layers, experts, expert_bytes)
    assert got == [
        ("0.25x", 64),
        ("0.25x", 64),
        ("1GiB", 2**30 // expert_bytes),  # floored to whole experts: 85
        ("96 slots", 96),
        ("1x", 256),
        ("1TB", 256),  # clamped to every expert of the model
    ]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--cache-budget", "6 parsecs"], "cannot read cache budget '6 parsecs'"),
        (["--cache-budget", "0"], "at least one slot"),
        (["--cache-budget", "1.5"], "a fraction must lie in (0, 1]"),
        (["--cache-budget", " , "], "--cache-budget is empty"),
        (["--budgets", "0.25,0.5"], "--budgets is retired"),
        (["--allocation", "diagonal"], "unknown cache allocation 'diagonal'"),
    ],
)
def test_bad_budgets_fail_in_one_line(bench, capsys, tmp_path, argv, fragment):
    code = bench.main([*argv, "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("peers.py: error: ") and fragment in err and "\n" not in err, err
    assert not any(tmp_path.iterdir())  # nothing prepared, nothing written
