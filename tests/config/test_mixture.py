"""lockstep.config.mixture, parsed directly (no config, no CLI): a ``FOLDER:WEIGHT`` entry's weight is
the exact fraction of the text written (0.7 is 7/10, not the float nearest it), the split is at the last
colon so a folder may hold colons, the smallest-share rule is decided exactly at its boundary, and every
malformed entry is refused in one line naming ``data.mixture`` and how to fix it. Exactness matters
because the interleaving's period and proportions are built from these fractions
(lockstep.data.interleave): a float weight would make a mixture's proportions, and so its sample order,
depend on rounding. tests/data/test_mixture.py refuses the common mistakes through ``lockstep train``;
these are the parser's own edges."""

from __future__ import annotations

from fractions import Fraction

import pytest

from lockstep.config.errors import ConfigError
from lockstep.config.mixture import SMALLEST_SHARE, parse_mixture


@pytest.fixture
def folders(tmp_path):
    names = ("alpha", "beta", "with:colon")
    for name in names:
        (tmp_path / name).mkdir()
    return {name: tmp_path / name for name in names}


def test_weights_are_the_exact_fractions_written(folders):
    alpha, beta, colon = folders["alpha"], folders["beta"], folders["with:colon"]
    parsed = parse_mixture([f"{alpha}:0.7", f" {beta}: 1/3 ", f"{colon}:2e-1"])
    assert [e.weight for e in parsed] == [Fraction(7, 10), Fraction(1, 3), Fraction(1, 5)]
    assert Fraction(0.7) != Fraction(7, 10)  # what a float would have given instead
    assert [e.name for e in parsed] == ["alpha", "beta", "with:colon"]  # the last colon splits
    assert [e.folder for e in parsed] == [alpha, beta, colon]
    assert parse_mixture([f"{alpha}/../beta:1"])[0].name == "beta"  # the folder's own name, resolved


def test_the_smallest_share_is_decided_exactly_at_its_boundary(folders):
    alpha, beta = folders["alpha"], folders["beta"]
    limit = 1 / SMALLEST_SHARE  # the other weight that leaves a weight of 1 exactly the smallest share
    at_limit = parse_mixture([f"{alpha}:1", f"{beta}:{limit - 1}"])
    assert at_limit[0].weight / sum(e.weight for e in at_limit) == SMALLEST_SHARE
    with pytest.raises(ConfigError, match=r"^data\.mixture: alpha has weight 1 of .*under the smallest share"):
        parse_mixture([f"{alpha}:1", f"{beta}:{limit}"])
    # the same shares written as decimals, which floats would round: 1e-6 of 1 exactly, still accepted
    parse_mixture([f"{alpha}:0.000001", f"{beta}:0.999999"])


@pytest.mark.parametrize(
    "weight, fragment",
    [
        ("0", "weight must be > 0; give it a positive weight or drop the entry"),
        ("-1/2", "weight must be > 0"),
        ("1/0", "weight '1/0' is not a number; write FOLDER:WEIGHT"),
        ("nan", "weight 'nan' is not a number"),
        ("inf", "weight 'inf' is not a number"),
        ("", "weight '' is not a number"),
    ],
)
def test_bad_weights_are_refused_in_one_line(folders, weight, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_mixture([f"{folders['alpha']}:{weight}"])
    message = str(caught.value)
    assert message.startswith("data.mixture: ") and fragment in message and "\n" not in message


def test_a_missing_folder_suggests_a_close_sibling_or_how_to_prepare_it(folders, tmp_path):
    with pytest.raises(ConfigError, match=f"no such folder {tmp_path}/alpah; did you mean {tmp_path}/alpha\\?$"):
        parse_mixture([f"{tmp_path}/alpah:1"])
    far = tmp_path / "gamma"
    with pytest.raises(
        ConfigError, match=f"no such folder {far}; prepare it first: lockstep data prepare .* --out {far}$"
    ):
        parse_mixture([f"{far}:1"])
    orphan = tmp_path / "no-parent" / "alpha"  # a parent that does not exist either: no siblings to offer
    with pytest.raises(ConfigError, match="prepare it first"):
        parse_mixture([f"{orphan}:1"])


def test_a_link_under_another_name_tells_two_folders_of_one_name_apart(tmp_path):
    """The refusal of two sources named alike offers linking one under another name: that must work."""
    (tmp_path / "x" / "alpha").mkdir(parents=True)
    (tmp_path / "y" / "alpha").mkdir(parents=True)
    with pytest.raises(ConfigError, match="two sources are named 'alpha'.*link it under another name"):
        parse_mixture([f"{tmp_path / 'x' / 'alpha'}:1", f"{tmp_path / 'y' / 'alpha'}:1"])
    (tmp_path / "beta").symlink_to(tmp_path / "y" / "alpha")
    parsed = parse_mixture([f"{tmp_path / 'x' / 'alpha'}:1", f"{tmp_path / 'beta'} : 1"])
    assert [e.name for e in parsed] == ["alpha", "beta"]  # the space before the colon is not part of the folder
