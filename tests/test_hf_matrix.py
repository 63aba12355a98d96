"""The plan on Hugging Face transformers backbones: tiny random-init configs (nothing downloaded)
of the families VLA policies are built on — Llama/SmolLM, Gemma, Qwen2 text backbones, SigLIP and
DINOv2 vision towers, and PaliGemma (SigLIP + Gemma) as a whole VLM — each set up by
``MixedPrecision`` in bf16-mixed, fp16-mixed and bf16-true and checked for: every norm and
rotary/position embedding found by a built-in rule, the dtypes their kernels really ran in (forward
and backward, traced at the aten level), the loss of a hand-written torch.amp loop where the
precision is the same, and the model's output types (ModelOutput, caches) left as they were."""

import pytest
import torch
from torch import nn

from vlamp import MixedPrecision
from vlamp.precision.verify import COMPUTE_OPS, REDUCTION_OPS, trace_compute_dtypes

T = pytest.importorskip("transformers")

LOW = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16, "bf16-true": torch.bfloat16}
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


def _text(model_cls, config_cls, **extra):
    def build():
        return model_cls(config_cls(**TEXT, **extra))

    def inputs():
        ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "labels": ids, "use_cache": True}
    return build, inputs, lambda out: out.loss


def _vision(model_cls, config_cls):
    def inputs():
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    return (lambda: model_cls(config_cls(**VISION))), inputs, \
        lambda out: out.last_hidden_state.float().square().mean()


def _paligemma():
    def build():
        vision = {**VISION, "num_hidden_layers": 1, "projection_dim": 32}
        text = {**TEXT, "vocab_size": 80, "num_key_value_heads": 1, "head_dim": 8}
        return T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
            vision_config=vision, text_config=text, image_token_index=79, vocab_size=80,
            projection_dim=32, hidden_size=32))

    def inputs():
        g = torch.Generator().manual_seed(0)
        ids = torch.cat([torch.full((2, 16), 79), torch.randint(1, 70, (2, 6), generator=g)], 1)
        return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
                "labels": ids}
    return build, inputs, lambda out: out.loss


FAMILIES = {
    "llama": _text(T.LlamaForCausalLM, T.LlamaConfig),  # also SmolLM's architecture
    "gemma": _text(T.GemmaForCausalLM, T.GemmaConfig, head_dim=8),
    "qwen2": _text(T.Qwen2ForCausalLM, T.Qwen2Config),
    "siglip": _vision(T.SiglipVisionModel, T.SiglipVisionConfig),
    "dinov2": _vision(T.Dinov2Model, T.Dinov2Config),
    "paligemma": _paligemma(),
}

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
    build, inputs, loss_of = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
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
    build, inputs, loss_of = FAMILIES[family]
    torch.manual_seed(0)
    reference = build()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ref_out = reference(**inputs())
    # Without vlamp's islands the precision is torch.amp's exactly: the same loss bits
    _, _, _, out, loss = run(family, "bf16-mixed", builtin_rules=False)
    assert type(out) is type(ref_out)
    assert loss == float(loss_of(ref_out))
    if getattr(ref_out, "past_key_values", None) is not None:
        assert type(out.past_key_values) is type(ref_out.past_key_values)
    # With them the loss moves towards FP32's
    _, _, _, out, loss = run(family, "bf16-mixed")
    torch.manual_seed(0)
    with torch.no_grad():
        fp32 = float(loss_of(build()(**inputs())))
    assert abs(loss - fp32) <= max(abs(float(loss_of(ref_out)) - fp32), 1e-3) * 1.5


def test_describe_says_which_rule_found_each_island_and_why():
    model, mp, _, _, _ = run("llama", "bf16-true")
    rows = {r["module"]: r for r in mp.describe().to_dicts()}
    norm = rows["model.layers.0.input_layernorm"]
    assert norm["rule"] == "builtin:norm(RMSNorm, upcasts itself)" and norm["params"] == "fp32"
    assert norm["compute"] == "fp32 (itself)"  # no second cast around its own upcast
    assert rows["model.rotary_emb"]["rule"] == "builtin:rotary-embedding(upcasts itself)"
    assert rows["model.layers.0.self_attn.q_proj"]["params"] == "bf16"
