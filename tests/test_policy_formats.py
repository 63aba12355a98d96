import pytest
import torch

from vlamp import FORMATS, MixedPrecision, Policy, VlampError, to_dtype


@pytest.mark.parametrize(("spec", "expected"), [
    ("params=fp32,compute=bf16,output=fp32", (torch.float32, torch.bfloat16, torch.float32)),
    ("p=f32,c=bfloat16,o=float16", (torch.float32, torch.bfloat16, torch.float16)),
    ("params=fp32,compute=bf16", (torch.float32, torch.bfloat16, torch.bfloat16)),  # output <- compute
    ("params=half", (torch.float16, torch.float16, torch.float16)),  # compute <- params
    ("P = FP32 , C = HALF", (torch.float32, torch.float16, torch.float16)),
    ("bf16", (torch.bfloat16, torch.bfloat16, torch.bfloat16)),
    ("float32", (torch.float32, torch.float32, torch.float32)),
])
def test_policy_grammar(spec, expected):
    p = Policy.parse(spec)
    assert (p.param, p.compute, p.output) == expected
    assert Policy.parse(str(p)) == p  # str() is itself valid grammar


@pytest.mark.parametrize(("spec", "fragment"), [
    ("params=fp64", "unknown precision 'fp64'"),
    ("params=fp32,compute=int8", "legal:"),
    ("param=fp32,weights=bf16", "bad entry 'weights=bf16'"),
    ("compute=bf16", "params=... is required"),
    ("p=fp32,p=bf16", "given twice"),
    ("", "empty spec"),
    ("p=fp32,,c=bf16", "bad entry"),
    ("p=fp16,c=bf16", "use params=fp16,compute=fp16, params=fp16,compute=fp32 or "
                      "params=fp32,compute=bf16"),
])
def test_policy_grammar_errors_name_the_problem(spec, fragment):
    with pytest.raises(VlampError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        Policy.parse(spec)


def test_policy_is_frozen_and_validates():
    p = Policy(torch.float32, torch.bfloat16, torch.bfloat16)
    with pytest.raises(AttributeError):
        p.param = torch.float16  # type: ignore[misc]
    assert Policy("fp32", "bf16", "bf16") == p
    with pytest.raises(VlampError, match="Policy.compute"):
        Policy(torch.float32, torch.int8, torch.float32)
    # nothing may accept a policy it cannot run: fp16 storage computing in bf16 is refused where
    # it enters (bf16 storage computing in fp32 runs: tests/test_storage.py)
    with pytest.raises(VlampError, match="params=fp16,compute=bf16"):
        MixedPrecision("fp32", {"0": "params=fp16,compute=bf16"})


def test_dtype_aliases_cover_every_documented_name():
    names = {"fp32": torch.float32, "float32": torch.float32, "f32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
    for name, dtype in names.items():
        assert to_dtype(name) == dtype


def test_format_table_matches_ieee_facts():
    assert list(FORMATS) == ["fp32", "tf32", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2"]
    fp16, bf16, tf32 = FORMATS["fp16"], FORMATS["bf16"], FORMATS["tf32"]
    assert fp16.max_normal == 65504.0
    assert fp16.min_subnormal == 2.0**-24
    assert fp16.min_normal == 2.0**-14
    assert bf16.epsilon == 2.0**-7 and bf16.min_normal == FORMATS["fp32"].min_normal
    assert (tf32.exponent_bits, tf32.mantissa_bits, tf32.epsilon) == (8, 10, 2.0**-10)
    assert tf32.min_normal == FORMATS["fp32"].min_normal
    assert FORMATS["fp8-e4m3"].max_normal == 448.0 and FORMATS["fp8-e5m2"].max_normal == 57344.0
    # The derived min-subnormal agrees with what torch really represents.
    for f in FORMATS.values():
        if f.dtype is not None:
            assert torch.tensor(f.min_subnormal).to(f.dtype).float().item() == f.min_subnormal
            assert torch.tensor(f.min_subnormal / 4).to(f.dtype).float().item() == 0.0
    # The BF16 fact from the design notes: 1 + 0.001 == 1.
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    assert (one + 0.001).item() == 1.0
