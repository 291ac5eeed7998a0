"""The command line's argument handling: overrides may stand anywhere among the options."""

import pytest

from maskedlm.cli import build_parser


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["train", "--data", "D", "a.b=1", "--out", "R", "c.d=2", "--resume"], ["a.b=1", "c.d=2"]),
        (["train", "optim.lr=1e-3", "--data", "D", "--out", "R"], ["optim.lr=1e-3"]),
        (["eval", "M", "eval.seed=3", "--data", "D", "eval.max_rows=5"], ["eval.seed=3", "eval.max_rows=5"]),
        (["masks", "D", "--rows", "2", "masking.unit=word"], ["masking.unit=word"]),
    ],
)
def test_overrides_between_options_are_all_kept(argv, expected):
    args = build_parser().parse_args(argv)
    assert args.overrides == expected


def test_train_options_still_parse_around_overrides():
    args = build_parser().parse_args(["train", "x.y=1", "--data", "D", "--out", "R", "--resume"])
    assert (args.data, args.out, args.resume) == ("D", "R", True)
