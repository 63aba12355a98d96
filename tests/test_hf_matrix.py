"""The plan on Hugging Face transformers backbones: tiny random-init configs (nothing downloaded)
of the families VLA policies are built on — Llama/SmolLM, Gemma, Qwen2 text backbones, SigLIP and
DINOv2 vision towers, and PaliGemma (SigLIP + Gemma) as a whole VLM — each set up by
``MixedPrecision`` in bf16-mixed, fp16-mixed and bf16-true and checked for: every norm and
rotary/position embedding found by a built-in rule, the dtypes their kernels really ran in (forward
and backward, traced at the aten level), the loss of a hand-written torch.amp loop where the
precision is the same, the loss within bf16's resolution of FP32's, and the model's output
types (ModelOutput, caches) left as they were."""

import pytest
import torch
import transformers as T  # the test extra installs it: every case runs
from conftest import assert_resume_is_bit_exact, run_main, tiny_overrides
from torch import nn

from vlamp import MixedPrecision
from vlamp.models.hf import PRESETS, build_hf_model
from vlamp.precision.verify import COMPUTE_OPS, REDUCTION_OPS, trace_compute_dtypes

LOW = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16, "bf16-true": torch.bfloat16}


def _ids(vocab=64, image_tokens=0):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, min(vocab, 70) - 1, (2, 6 if image_tokens else 8), generator=g)
    return torch.cat([torch.full((2, image_tokens), vocab - 1), text], 1) if image_tokens else text


def _pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _text():
    ids = _ids()
    return lambda: {"input_ids": ids, "labels": ids, "use_cache": True}, lambda out: out.loss


def _vision():
    return lambda: {"pixel_values": _pixels()}, lambda out: out.last_hidden_state.float().square().mean()


def _vlm():
    ids = _ids(80, image_tokens=16)  # (32 / 8)^2 patches, each one image token
    return lambda: {"input_ids": ids, "pixel_values": _pixels(), "labels": ids}, lambda out: out.loss


# family -> (inputs, loss); the models are vlamp's presets (vlamp.models.hf.PRESETS)
FAMILIES = {"llama": _text(), "gemma": _text(), "qwen2": _text(), "siglip": _vision(),
            "dinov2": _vision(), "paligemma": _vlm()}


NORM_SUFFIXES = ("RMSNorm", "LayerNorm")


def fragile(model):
    """What must not compute in low precision: every norm, rotary embedding and vision
    patch/position embedding block, by what the module is (independently of vlamp's rules)."""
    out = {}
    for name, m in model.named_modules():
        cls = type(m).__name__
        if cls.endswith(NORM_SUFFIXES):
            out[name] = "norm"
        elif cls.endswith("RotaryEmbedding"):
            out[name] = "rotary"
        elif cls.endswith(("VisionEmbeddings", "Dinov2Embeddings")):
            out[name] = "embeddings"
    return out


def run(family, mode, builtin_rules=True):
    inputs, loss_of = FAMILIES[family]
    torch.manual_seed(0)
    model = build_hf_model(family)
    mp = MixedPrecision(mode, builtin_rules=builtin_rules)
    mp.setup(model)
    kwargs = inputs()

    def step():
        with mp.autocast():
            out = model(**kwargs)
            loss = loss_of(out)
        mp.backward(loss)
        step.out, step.loss = out, loss

    seen = trace_compute_dtypes(model, step, backward=True, ops=COMPUTE_OPS | REDUCTION_OPS)
    return model, mp, seen, step.out, float(step.loss.detach())


@pytest.mark.parametrize("mode", list(LOW))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_fragile_part_is_found_and_computes_in_fp32(family, mode):
    model, mp, seen, out, loss = run(family, mode)
    parts = fragile(model)
    kinds = set(parts.values())
    assert "norm" in kinds and ("rotary" in kinds or "embeddings" in kinds), parts
    rows = {r.name: r for r in mp.resolved}
    for name, kind in parts.items():
        assert rows[name].decided_by.startswith("builtin:"), (name, rows[name].decided_by)
        assert rows[name].policy.param == torch.float32  # their weights and buffers stay FP32
        ran = seen.get(name, set())
        if kind == "embeddings":  # the patch convolution, below the rule
            ran = set().union(*(seen.get(n, set()) for n in seen if n == name or n.startswith(name + ".")))
        assert ran == {torch.float32}, (name, ran)
    # ... and the bulk runs in low precision: every attention/MLP projection that ran
    projections = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                   and n in seen and not any(n.startswith(p + ".") for p in parts)
                   and not rows[n].decided_by.startswith("builtin:")]
    assert projections and all(seen[n] == {LOW[mode]} for n in projections), \
        {n: seen[n] for n in projections if seen[n] != {LOW[mode]}}
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_keep_their_types_and_the_loss_matches_torch_amp(family):
    inputs, loss_of = FAMILIES[family]
    torch.manual_seed(0)
    reference = build_hf_model(family)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ref_out = reference(**inputs())
    # Without vlamp's islands the precision is torch.amp's exactly: the same loss bits
    _, _, _, out, loss = run(family, "bf16-mixed", builtin_rules=False)
    assert type(out) is type(ref_out)
    assert loss == float(loss_of(ref_out))
    if getattr(ref_out, "past_key_values", None) is not None:
        assert type(out.past_key_values) is type(ref_out.past_key_values)
    # With them the loss stays within one bf16 step (2^-8, relative) of FP32's. (They are not
    # claimed to move it closer: on one batch the difference is rounding noise either way, and
    # measured here vlamp's and torch.amp's distances were equal for five families and 4x apart,
    # both below 2e-4 on a loss of ~4, for paligemma.)
    _, _, _, out, loss = run(family, "bf16-mixed")
    torch.manual_seed(0)
    with torch.no_grad():
        fp32 = float(loss_of(build_hf_model(family)(**inputs())))
    assert abs(loss - fp32) <= 2**-8 * abs(fp32)


def test_describe_says_which_rule_found_each_island_and_why():
    model, mp, _, _, _ = run("llama", "bf16-true")
    rows = {r["module"]: r for r in mp.describe().to_dicts()}
    norm = rows["model.layers.0.input_layernorm"]
    assert norm["rule"] == "builtin:norm(RMSNorm, upcasts itself)" and norm["params"] == "fp32"
    assert norm["compute"] == "fp32 (itself)"  # no second cast around its own upcast
    assert rows["model.rotary_emb"]["rule"] == "builtin:rotary-embedding(upcasts itself)"
    assert rows["model.layers.0.self_attn.q_proj"]["params"] == "bf16"


def test_every_preset_is_in_the_matrix():
    assert set(FAMILIES) == set(PRESETS) and len(PRESETS) == 6


def test_a_name_that_is_no_preset_and_no_file_is_refused_before_transformers_is_imported():
    """Importing transformers takes seconds; a mistyped --model is told at once."""
    import subprocess
    import sys

    code = ("import sys\nfrom vlamp.models.hf import build_hf_model\n"
            "try:\n    build_hf_model('pi0', device='meta')\nexcept Exception as e:\n"
            "    print(type(e).__name__, 'transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["VlampError", "False"], out.stdout + out.stderr


def test_plan_describes_a_transformers_config_without_building_its_weights(tmp_path, capsys):
    import json

    config = T.Qwen2Config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                           architectures=["Qwen2ForCausalLM"])
    config.to_json_file(tmp_path / "config.json")  # ~0.4 B parameters: on the meta device, no memory
    code, out, err = run_main(capsys, "plan", "--model", str(tmp_path), "--mode", "bf16-true",
                              "--update", "stochastic", "--json")
    assert code == 0, err[-2000:]
    rows = {r["module"]: r for r in json.loads(out)}
    norms = [r for r in rows.values() if r["class"] == "Qwen2RMSNorm"]
    assert len(norms) == 2 * 8 + 1 and all(r["rule"].startswith("builtin:norm(RMSNorm") for r in norms)
    assert rows["model.layers.0.self_attn.q_proj"]["params"] == "bf16"
    assert rows["model.layers.0.self_attn.q_proj"]["B/param"] == 8
    code, _, err = run_main(capsys, "plan", "--model", "nope")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "llama, gemma" in err


@pytest.mark.slow
def test_hf_vlm_trains_resumes_and_acts_through_vlamps_trainer(tiny_dataset, tmp_path):
    """model.name=hf-vlm: PaliGemma's architecture with vlamp's chunk head, trained by the same
    trainer (bf16-mixed, built-in islands on its own norms and embeddings), resumed bit for bit,
    and loaded back as a policy."""
    from vlamp.models.hf_vla import HFVLA
    from vlamp.train.config_io import load_config
    from vlamp.train.policy import load_policy
    from vlamp.train.trainer import Trainer

    def train(out, *more):
        cfg = load_config(None, tiny_overrides(tiny_dataset, out, "bf16-mixed", "model.name=hf-vlm",
                                               *more))
        trainer = Trainer(cfg, progress=False)
        return trainer, trainer.fit()

    trainer, full = train(tmp_path / "full")
    assert isinstance(trainer.model, HFVLA) and all(torch.isfinite(torch.tensor(full.losses)))
    rows = {r.name: r for r in trainer.mp.resolved}
    islands = {n: r.decided_by for n, r in rows.items() if r.decided_by.startswith("builtin:")}
    assert islands["action_out"] == "builtin:action-output"
    assert islands["backbone.vision_tower.vision_model.embeddings"].startswith("builtin:patch-and")
    assert islands["backbone.language_model.norm"] == "builtin:norm(RMSNorm, upcasts itself)"
    assert_resume_is_bit_exact(tmp_path / "full", train)
    loaded = load_policy(str(tmp_path / "full"))
    model = loaded.policy.model
    batch = model.example_batch(2)
    assert model.predict(batch["image"], batch["state"], batch["tokens"]).shape == (2, 4, 4)


def test_hf_vlm_builds_from_a_local_config_and_loads_its_local_weights(tmp_path):
    from vlamp import VlampError
    from vlamp.models.config import ModelConfig
    from vlamp.models.hf_vla import HFVLA

    saved = build_hf_model("paligemma")  # what a user's save_pretrained wrote
    saved.save_pretrained(tmp_path / "vlm", safe_serialization=True)
    shape = dict(name="hf-vlm", vocab_size=80, image_size=32, chunk=4, channels=[8, 8],
                 hf_config=str(tmp_path / "vlm"))
    random_init = HFVLA(ModelConfig(**shape))
    loaded = HFVLA(ModelConfig(**shape, hf_pretrained=True))
    want = saved.model.state_dict()
    got = loaded.backbone.state_dict()
    assert got.keys() == random_init.backbone.state_dict().keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(random_init.backbone.state_dict()["multi_modal_projector.linear.weight"],
                           want["multi_modal_projector.linear.weight"])
    with pytest.raises(VlampError, match="needs model.hf_config to be the directory"):
        HFVLA(ModelConfig(**{**shape, "hf_config": ""}, hf_pretrained=True))


@pytest.mark.slow
def test_a_config_json_that_is_not_json_or_has_no_model_type_is_one_line(tiny_dataset, tmp_path,
                                                                         capsys):
    cases = (("broken", "{not json", "is not valid JSON", "train"),  # one command each: both
             ("untyped", '{"hidden_size": 8}', "has no model_type key", "plan"))  # read it alike
    for name, text, why, command in cases:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        train = [*tiny_overrides(tiny_dataset, tmp_path / f"run-{name}", "fp32"), "model.name=hf-vlm",
                 f"model.hf_config={tmp_path / name}"]
        args = ["train", *train] if command == "train" else ["plan", "--model",
                                                             str(tmp_path / name)]
        code, _, err = run_main(capsys, *args)  # in this process: the imports are paid once
        lines = [line for line in err.strip().splitlines() if "frame/s" not in line]
        assert code == 2 and len(lines) == 1 and len(lines[0]) < 300, err[-3000:]
        assert "not a transformers config" in lines[0] and why in lines[0]


def test_gpt2s_learned_position_embedding_is_an_fp32_island():
    """GPT-2 names its learned positions ``wpe``: stored in FP32 in bf16-true like every
    positional embedding, while the token embedding ``wte`` is stored in bf16."""
    from vlamp import PrecisionPlan

    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                           n_positions=32))
    rows = {r.name: r for r in PrecisionPlan("bf16-true").resolve(model)}
    assert rows["transformer.wpe"].decided_by == "builtin:positional-embedding"
    assert rows["transformer.wpe"].policy.param == torch.float32
    assert rows["transformer.wte"].policy.param == torch.bfloat16


def test_hf_vlm_blocks_checkpoint_and_give_the_same_gradients():
    """A checkpointed decoder layer is run again in the backward; with a KV cache its keys were
    appended twice (a 178-vs-89 shape error at the first backward of `fit`'s choice)."""
    from vlamp.models.config import ModelConfig
    from vlamp.models.registry import build_model
    from vlamp.precision.memory import checkpoint_modules

    cfg = ModelConfig(name="hf-vlm", dim=32, depth=2, heads=2, text_layers=1, chunk=4,
                      vocab_size=20, image_size=32)

    def grads(blocks):
        torch.manual_seed(0)
        model = build_model(cfg)
        if blocks:
            assert checkpoint_modules(model, blocks)
        model(model.example_batch(2)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads([]), grads(["GemmaDecoderLayer", "SiglipEncoderLayer"])
    assert plain.keys() == ckpt.keys() and all(torch.allclose(plain[k], ckpt[k]) for k in plain)
