"""The mutation check (tests/mutants.py) still points at the code: a rewrite that moves a snippet makes
its mutant "target not found", and the behaviour it guards goes unchecked until someone runs the check
by hand. (It happened: the hot-path work of issue 18 moved four of them.) This runs in CI; the check
itself, which runs the tests against each planted bug, takes minutes and is run by hand."""

from __future__ import annotations

import pytest
from mutants import MUTANTS, ROOT, Mutant, plant


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_plants_its_bug_in_the_code_as_it_is(mutant: Mutant) -> None:
    source = ROOT / mutant.path
    original = source.read_text(encoding="utf-8")
    mutated, why = plant(original, mutant)
    assert mutated is not None, f"{mutant.name}: {why}; re-target it in tests/mutants.py"
    assert mutated != original
    for selection in mutant.tests:
        assert (ROOT / selection.split("::")[0]).is_file(), f"{mutant.name}: no test file {selection}"


def test_a_moved_snippet_is_reported_not_planted() -> None:
    mutant = Mutant("moved", "nothing", "gateway/proxy.py", (("no such line in the proxy", "x"),), ())
    mutated, why = plant((ROOT / mutant.path).read_text(encoding="utf-8"), mutant)
    assert mutated is None
    assert "snippet not found" in why
