import json
import subprocess
import sys

import pytest
from conftest import run_main

from vlamp.cli.main import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "vlamp", *args], capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_doctor_json_has_the_documented_keys():
    rc, out, err = run_cli("doctor", "--json", "--budget", "0.02")
    assert rc == 0, err
    data = json.loads(out)
    assert set(data) == {"hardware", "formats", "auto_mode", "reason", "throughput", "tf32"}
    assert (data["tf32"] is None) == (data["hardware"]["device"] == "cpu")
    assert set(data["formats"]) == {"fp32", "tf32", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2"}
    assert set(data["throughput"]) == {"gemm", "conv", "attention"}
    assert set(data["throughput"]["gemm"]) == {"fp32", "bf16", "fp16"}
    assert all(v > 0 for d in data["throughput"].values() for v in d.values())
    assert data["auto_mode"] in {"fp32", "bf16-mixed", "fp16-mixed"} and data["reason"]


def test_doctor_text(capsys):
    assert main(["doctor", "--budget", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "auto mode" in out and "fp8-e4m3" in out and "GFLOP/s" in out
    assert "\n  attention fp32 " in out  # the row is named in full, its columns aligned


def test_throughput_measures_the_kinds_asked_for():
    from vlamp import VlampError, measure_throughput

    assert set(measure_throughput(budget_s=0.001, kinds=("gemm",))) == {"gemm"}
    attention = measure_throughput(budget_s=0.001, kinds=("attention",))["attention"]
    assert set(attention) == {"fp32", "bf16", "fp16"} and all(v > 0 for v in attention.values())
    with pytest.raises(VlampError, match="unknown kind.s. flash; legal: gemm, conv, attention"):
        measure_throughput(kinds=("flash",))


def test_plan_prints_the_table_with_islands(capsys):
    assert main(["plan", "--mode", "bf16-true", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "builtin:action-output" in out and "mode bf16-true" in out


def test_plan_json_and_rules_file(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("builtin_rules: false\nrules:\n  - {pattern: 'trunk.*', policy: fp32}\n"
                     "  - {pattern: nothing, policy: fp32}\n")
    assert main(["plan", "--mode", "bf16-mixed", "--rules", str(rules), "--json"]) == 0
    captured = capsys.readouterr()
    rows = {r["module"]: r for r in json.loads(captured.out)}  # warnings do not pollute the JSON
    assert rows["trunk.0.qkv"]["compute"] == "fp32" and rows["trunk.0.qkv"]["rule"] == "trunk.*"
    assert rows["trunk"]["rule"] == "inherited" and rows["text.layers.0.qkv"]["compute"] == "bf16"
    assert rows["action_out"]["rule"] == "inherited"  # builtins off
    assert "'nothing' matches no module" in captured.err


def test_plan_with_run_config_keys_describes_what_the_trainer_sets_up(capsys):
    """``vlamp plan train.lora... train.freeze...`` (on the meta device) shows per module what a
    real MixedPrecision setup of the adapted, frozen model holds."""
    import torch

    from vlamp import MixedPrecision
    from vlamp.models.lora import add_lora, frozen_bases
    from vlamp.models.registry import build_model
    from vlamp.models.tokenizer import WordTokenizer
    from vlamp.sim.tasks import DEFAULT_SUITE, TASKS
    from vlamp.train.config_io import load_config

    keys = ["train.lora.rank=4", "train.lora.targets=[trunk.*.qkv]", "train.freeze=[vision]"]
    assert main(["plan", "--mode", "bf16-mixed", "--json", *keys]) == 0
    shown = {r["module"]: r for r in json.loads(capsys.readouterr().out)}
    config = load_config(None, keys)
    config.model.vocab_size = len(WordTokenizer.build(TASKS[t].instruction for t in DEFAULT_SUITE))
    model = build_model(config.model)
    adapted = add_lora(model, ["trunk.*.qkv"], 4, config.train.lora.alpha)
    mp = MixedPrecision("bf16-mixed", freeze=["vision", *frozen_bases(adapted)])
    mp.setup(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    real = {r["module"]: r for r in mp.describe().to_dicts()}
    columns = ("params", "grad", "optim", "#params", "B/param")
    assert {m: [r[c] for c in columns] for m, r in shown.items()} == \
        {m: [r[c] for c in columns] for m, r in real.items()}
    assert shown["vision.stages.0.conv"]["optim"] == "frozen" == shown["trunk.0.qkv.base"]["optim"]
    assert shown["trunk.0.qkv.lora_A"]["optim"] == "fp32"  # the adapters train
    assert main(["plan", "--mode", "bf16-mixed", *keys]) == 0
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters trained" \
        in capsys.readouterr().out


@pytest.mark.parametrize(("args", "fragment"), [
    (["plan", "--mode", "fp64-mixed"], "unknown mode 'fp64-mixed'; legal:"),
    (["plan", "--rules", "/no/such/file.yaml"], "cannot read"),
    (["frobnicate"], "invalid choice"),
    (["plan", "--depth", "x"], "invalid int value"),
    (["plan", "--lean-islands", "-0.1"], "--lean-islands must be a fraction >= 0 (0: off)"),
    (["plan", "--size", "base", "model.size=large"], "give the model's shape as config keys"),
    (["plan", "--model", "pi0"], "the pi0-sized VLA is model.name=hf-vlm model.size=pi0"),
    (["plan", "train.lora.rank=2", "train.lora.targets=[nothing]"], "matches no linear layer"),
])
def test_user_errors_are_one_line_and_exit_2(args, fragment, capsys):
    rc, _, err = run_main(capsys, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(("args", "fragment"), [
    (["eval", "--tasks", "drawer-open,fly"], "unknown task 'fly'; suites: default, mt10, mt50"),
    (["eval", "--policy", "oracle"], "unknown policy 'oracle'; legal: expert, random"),
    (["data", "generate", "--tasks", "nope"], "unknown task 'nope'"),
    (["data", "generate", "--out", "/"], "already exists"),
    (["eval", "--json", "/no/such/dir/r.json"], "cannot write"),
])
def test_data_and_eval_user_errors(args, fragment, capsys):
    rc, _, err = run_main(capsys, *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.slow
def test_eval_expert_cli_writes_json(tmp_path):
    path = tmp_path / "r.json"
    rc, out, err = run_cli("eval", "--policy", "expert", "--tasks", "faucet-open", "--episodes", "1",
                           "--json", str(path))
    assert rc == 0, err
    data = json.loads(path.read_text())
    assert data["policy"] == "expert" and data["per_task"][0]["successes"] == 1
    assert "faucet-open" in out
