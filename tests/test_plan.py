import warnings

import pytest
import torch
from demo_model import DemoVLA
from torch import nn

from vlamp import BUILTIN_RULES, Policy, PrecisionPlan, Rule, VlampError, describe_plan

FP32 = Policy.parse("fp32")
BF16 = Policy.parse("bf16")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(12)])
        self.action_head = nn.Linear(4, 4)
        self.action_head2 = nn.Linear(4, 4)


def policies(plan, model):
    return {r.name: (r.policy, r.decided_by) for r in plan.resolve(model)}


def test_exact_name_glob_and_class_boundaries():
    plan = PrecisionPlan("bf16-true", [("layers.1", "fp32"), ("action_head", "fp32")],
                         builtin_rules=False)
    got = policies(plan, Net())
    assert got["layers.1"] == (FP32, "layers.1")
    assert got["layers.1.fc"] == (FP32, "inherited")  # children inherit
    assert got["layers.10"][0] == BF16  # "layers.1" is not a prefix match
    assert got["layers.10.fc"][0] == BF16
    assert got["action_head"][0] == FP32
    assert got["action_head2"] == (BF16, "inherited")
    assert got[""] == (BF16, "mode default")


def test_first_match_wins_and_user_rules_precede_builtins():
    plan = PrecisionPlan("bf16-mixed", [("layers.*.norm", "bf16"), ("layers.*", "fp32")])
    got = policies(plan, Net())
    assert got["layers.3.norm"] == (BF16, "layers.*.norm")  # overrides the builtin norm rule
    assert got["layers.3"][0] == FP32
    plan2 = PrecisionPlan("bf16-mixed", [("layers.*", "fp32"), ("layers.*.norm", "bf16")])
    with pytest.warns(UserWarning, match="'layers.\\*.norm' matches no module"):  # shadowed
        assert policies(plan2, Net())["layers.3.norm"] == (FP32, "layers.*")


def test_class_name_rules_match_through_the_mro():
    class MyNorm(nn.LayerNorm):
        pass

    model = nn.Sequential(MyNorm(4), nn.Linear(4, 4))
    got = policies(PrecisionPlan("bf16-mixed"), model)
    assert got["0"] == (FP32, "builtin:norm(LayerNorm)")
    assert got["1"][1] == "inherited"
    got = policies(PrecisionPlan("bf16-mixed", builtin_rules=False), model)
    assert got["0"][1] == "inherited"


def test_norms_of_other_libraries_are_found_by_their_class_name_family():
    class LlamaRMSNorm(nn.Module):  # shaped like Hugging Face's: no torch norm in its MRO
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class T5LayerNorm(LlamaRMSNorm):
        pass

    class NormalizedLinear(nn.Linear):  # "Norm" inside a name is not a norm
        pass

    model = nn.Sequential(LlamaRMSNorm(4), T5LayerNorm(4), NormalizedLinear(4, 4))
    got = policies(PrecisionPlan("bf16-mixed"), model)
    assert got["0"] == (FP32, "builtin:norm(RMSNorm)") and got["1"] == (FP32, "builtin:norm(LayerNorm)")
    assert got["2"][1] == "inherited"


def test_builtin_rules_find_every_fragile_part_of_the_demo_model():
    got = policies(PrecisionPlan("bf16-mixed"), DemoVLA())
    islands = {name for name, (pol, rule) in got.items() if rule.startswith("builtin:")}
    assert islands == {"vision.1", "pos_embed", "trunk.norm1", "trunk.norm2", "action_out"}
    assert all(got[n][0] == FP32 for n in islands)
    assert len(BUILTIN_RULES) == 26


def test_unmatched_user_rule_warns():
    plan = PrecisionPlan("bf16-mixed", {"decoder.*": "fp32", "action_head": "fp32"})
    with pytest.warns(UserWarning, match="'decoder.\\*' matches no module"):
        plan.resolve(Net())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrecisionPlan("bf16-mixed").resolve(Net())  # builtin rules never warn


def test_yaml_round_trip(tmp_path):
    plan = PrecisionPlan("bf16-true", {"action_head": "p=fp32,c=fp32,o=bf16"}, builtin_rules=False)
    path = tmp_path / "plan.yaml"
    plan.save(path)
    back = PrecisionPlan.load(path)
    assert back.to_dict() == plan.to_dict()
    assert back.user_rules[0].policy == Policy(torch.float32, torch.float32, torch.bfloat16)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(("text", "fragment"), [
    ("rules: [{pattern: x, policy: fp64}]", "unknown precision 'fp64'"),
    ("rules: [{pattern: x}]", "must be a list of"),
    ("modes: fp32", "unknown keys \\['modes'\\]"),
    ("rules: [unclosed", "not valid YAML"),
    ("- a\n- b", "expected a mapping"),
    ("mode: fp16-mixed", "is for mode 'fp16-mixed', but mode 'bf16-mixed'"),
])
def test_bad_rules_files(tmp_path, text, fragment):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(VlampError, match=fragment):
        PrecisionPlan.load(path, mode="bf16-mixed")


def test_missing_rules_file():
    with pytest.raises(VlampError, match="cannot read"):
        PrecisionPlan.load("/nonexistent/rules.yaml")


def test_describe_rows_and_folding():
    model = DemoVLA()
    table = describe_plan(PrecisionPlan("bf16-true"), model)
    rows = {r.module: r for r in table.rows}
    assert len(table.rows) == len(list(model.named_modules()))
    assert (rows["action_out"].params, rows["action_out"].compute, rows["action_out"].optim) == \
        ("fp32", "fp32", "fp32")
    assert (rows["trunk.linear1"].params, rows["trunk.linear1"].grad, rows["trunk.linear1"].optim) == \
        ("bf16", "bf16", "fp32")  # master weights keep the optimizer state in fp32
    assert sum(r.num_params for r in table.rows) == sum(p.numel() for p in model.parameters())
    folded = describe_plan(PrecisionPlan("bf16-true"), model, max_depth=1)
    frows = {r.module: r for r in folded.rows}
    assert set(frows) == {"(root)", "vision", "token_embed", "pos_embed", "trunk", "head", "action_out"}
    assert frows["vision"].params == "bf16+fp32"  # the GroupNorm island inside
    assert sum(r.num_params for r in folded.rows) == sum(p.numel() for p in model.parameters())
    assert "mode bf16-true" in str(folded)


def test_rule_validation():
    with pytest.raises(VlampError, match="pattern must be a non-empty string"):
        Rule("", FP32)
    with pytest.raises(VlampError, match="expected Rule or"):
        PrecisionPlan("fp32", [("a", "fp32", "extra")])
