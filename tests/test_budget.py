import pytest

from cdka_search.budget import lora_params, parse_budget
from cdka_search.errors import BudgetError
from cdka_search.spec import load_spec

LLAMA = load_spec("llama-2-7b")


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("0.5%", 33_692_078),  # int(6,738,415,616 * 0.005), model-shapes.md total
        ("1 %", 67_384_156),
        ("20M", 20_000_000),
        ("1.5B", 1_500_000_000),
        ("2e7", 20_000_000),
        ("20000000", 20_000_000),
        ("20_000_000", 20_000_000),
        ("20,000,000", 20_000_000),
        ("1_000", 1_000),
        (".5%", 33_692_078),
        ("250k", 250_000),
        ("lora:8", 19_988_480),  # cdka-notes.md section 1: LoRA r=8 on all 7 linears x 32 blocks
        ("LoRA:1", 2_498_560),
    ],
)
def test_budget_forms(text, limit):
    assert parse_budget(text, total_params=LLAMA.total_params, targets=LLAMA.targets).limit == limit


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0%", "above 0"),
        ("-1%", "above 0"),
        ("101%", "at most 100"),
        ("abc", "not understood"),
        ("-5", "not understood"),
        ("0", "at least one"),
        ("lora:0", "an integer from 1 to 1,048,576"),
        ("lora:x", "an integer from 1 to 1,048,576"),
        ("9B", "exceeds"),
        ("nan%", "is not a number"),
        # Python's int() and float() read these; a budget is ASCII, digits grouped in threes at most
        ("５%", "budget '５%': write it with ASCII digits and letters"),
        ("lora:８", "budget 'lora:８': write it with ASCII digits and letters"),
        ("²", "budget '²': write it with ASCII digits and letters"),
        ("1_0", "budget '1_0' is not understood"),
        ("1__000", "budget '1__000' is not understood"),
        ("2_e7", "budget '2_e7' is not understood"),
        ("0._5%", "budget '0._5%' is not a number"),
        ("lora:_8", "budget 'lora:_8': the LoRA rank must be an integer"),
        ("1,0", "budget '1,0' is not understood"),
        ("infinity", "budget 'infinity' is not understood"),
    ],
)
def test_bad_budgets(text, message):
    with pytest.raises(BudgetError, match=message):
        parse_budget(text, total_params=LLAMA.total_params, targets=LLAMA.targets)


def test_lora_params_counts_each_target():
    # q,k,v,o: 4 * 8 * 8192; gate, up, down: 3 * 8 * 15104; times 32 blocks
    assert lora_params(LLAMA.targets, 8) == 32 * (4 * 8 * 8192 + 3 * 8 * 15104)
