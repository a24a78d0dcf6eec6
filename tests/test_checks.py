import pytest

from obcompress.checks import (
    MaskStructure,
    check_bits,
    check_damp,
    check_group_size,
    check_int,
    check_selector,
    check_sparsity,
    parse_mask_structure,
    selector_matches,
)

# ---------------------------------------------------------------- mask structures


@pytest.mark.parametrize(
    "text,kind,n,m,block,fixed",
    [
        ("unstructured", "unstructured", 0, 0, 1, None),
        ("  Unstructured ", "unstructured", 0, 0, 1, None),
        ("2:4", "nm", 2, 4, 1, 0.5),
        ("1:4", "nm", 1, 4, 1, 0.75),
        ("3:8", "nm", 3, 8, 1, 0.625),
        ("block:4", "block", 0, 0, 4, None),
        ("BLOCK:16", "block", 0, 0, 16, None),
        ("block:1", "unstructured", 0, 0, 1, None),
    ],
)
def test_parse_mask_structure_accepts(text, kind, n, m, block, fixed):
    ms = parse_mask_structure(text)
    assert isinstance(ms, MaskStructure)
    assert (ms.kind, ms.n, ms.m, ms.block) == (kind, n, m, block)
    assert ms.fixed_sparsity == fixed
    assert parse_mask_structure(str(ms)) == ms
    if kind == "nm":
        assert ms.pruned_per_group == m - n


@pytest.mark.parametrize(
    "text",
    ["4:4", "0:4", "5:4", "2:0", "2:", ":4", "a:b", "2-4", "2:4:8", "block", "block:", "block:0", "block:-2",
     "block:x", "", "dense", "n:m", None, 4, 0.5],
)
def test_parse_mask_structure_rejects(text):
    with pytest.raises(ValueError, match="mask_structure"):
        parse_mask_structure(text)


def test_parse_mask_structure_checks_cols():
    assert parse_mask_structure("2:4", 12).m == 4
    assert parse_mask_structure("block:3", 9).block == 3
    assert parse_mask_structure("unstructured", 7).kind == "unstructured"
    for text, cols in [("2:4", 10), ("1:8", 12), ("block:4", 6)]:
        with pytest.raises(ValueError, match="divisible"):
            parse_mask_structure(text, cols)


# ---------------------------------------------------------------- numbers


def test_check_sparsity_and_bits():
    for ok in (0, 0.0, 0.5, 0.999):
        check_sparsity(ok)
    for bad in (1.0, 1, -0.01, float("nan"), float("inf"), None, True, "0.5"):
        with pytest.raises(ValueError, match="sparsity"):
            check_sparsity(bad)
    for ok in range(2, 9):
        check_bits(ok)
    for bad in (1, 9, 4.0, True, None):
        with pytest.raises(ValueError, match="bits"):
            check_bits(bad)


def test_messages_name_the_value_the_same_way_everywhere():
    # The recipe, the solvers and the search space pass their own name for the value.
    with pytest.raises(ValueError, match=r"^quantization.num_bits must be an integer in 2..8, got 9$"):
        check_bits(9, "quantization.num_bits")
    with pytest.raises(ValueError, match=r"^variant sparsity must be a number in \[0, 1\), got 1.5$"):
        check_sparsity(1.5, "variant sparsity")
    with pytest.raises(ValueError, match=r"^damp must be 'auto' or a number >= 0, got -1$"):
        check_damp(-1)
    with pytest.raises(ValueError, match=r"^relative dampening must be a number >= 0, got 'auto'$"):
        check_damp("auto", "relative dampening", auto=False)
    with pytest.raises(ValueError, match=r"^group_size must be an integer >= 1 when strategy is 'group', got 0$"):
        check_group_size(0)
    with pytest.raises(ValueError, match=r"^count must be an integer >= 0, got -1$"):
        check_int(-1, "count", 0)
    with pytest.raises(ValueError, match=r"^zero must be an integer in 0..15, got 16$"):
        check_int(16, "zero", 0, 15)
    assert check_damp("auto") == "auto" and check_damp(0) == 0.0 and isinstance(check_damp(1), float)
    for bad in (True, float("nan"), float("inf"), "0.1", None):
        with pytest.raises(ValueError, match="damp"):
            check_damp(bad)
    for bad in (0, 2.0, True, None):
        with pytest.raises(ValueError, match="group_size"):
            check_group_size(bad)


def test_selectors():
    assert check_selector("re:fc[0-9]", "targets[0]") == "re:fc[0-9]"
    with pytest.raises(ValueError, match=r"^targets\[1\]: bad regular expression 'conv\['"):
        check_selector("re:conv[", "targets[1]")
    for bad in ("", 3, None):
        with pytest.raises(ValueError, match=r"^ignore\[0\] must be a non-empty string"):
            check_selector(bad, "ignore[0]")
    assert selector_matches("re:fc[0-9]", "fc1", "Linear") and not selector_matches("re:fc", "fc1", "Linear")
    assert selector_matches("Linear", "fc1", "Linear") and not selector_matches("Linear", "fc1", None)
    assert selector_matches("fc1", "fc1", None)
