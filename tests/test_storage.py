"""bf16-storage: weights stored in bf16, every kernel in fp32 (traced), gradients in the storage
dtype, stochastic rounding by default (8 bytes of state per parameter with AdamW), and the fp32
copies of the weights never saved for the backward."""

import pytest
import torch
from torch import nn

from vlamp import ActivationMeter, MixedPrecision, Policy, UpdateSettings
from vlamp.precision.update import StochasticUpdate
from vlamp.precision.verify import COMPUTE_OPS, REDUCTION_OPS, trace_compute_dtypes


class Net(nn.Module):
    """A conv, attention that reads its out_proj's weight directly, a norm and linears."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(h)).square().mean()


def batch():
    return torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def setup(mode="bf16-storage", **kw):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mp = MixedPrecision(mode, **kw)
    mp.setup(model, opt)
    return model, opt, mp


def test_weights_are_stored_in_bf16_and_every_kernel_computes_in_fp32():
    model, opt, mp = setup()
    stored = {n: p.dtype for n, p in model.named_parameters()}
    assert stored["conv.weight"] == stored["attn.in_proj_weight"] == stored["head.weight"] == torch.bfloat16
    assert stored["attn.out_proj.weight"] == torch.bfloat16  # used by its parent, never called
    assert stored["norm.weight"] == torch.float32  # an FP32 island, as in every mode
    x = batch()

    def step():
        with mp.autocast():
            loss = model(x)
        mp.backward(loss)

    seen = trace_compute_dtypes(model, step, backward=True, ops=COMPUTE_OPS | REDUCTION_OPS)
    assert {"conv", "attn", "norm", "head"} <= set(seen)
    assert all(dtypes == {torch.float32} for dtypes in seen.values()), seen
    assert all(p.grad is None or p.grad.dtype == p.dtype for p in model.parameters())
    assert isinstance(mp.weights, StochasticUpdate) and mp.settings.method == "stochastic"
    assert mp.weights.grads(opt) and all(g.dtype == torch.bfloat16 for g in mp.weights.grads(opt)
                                         if g.shape == model.head.weight.shape)


def test_it_trains_and_holds_8_bytes_per_parameter_with_adamw():
    model, opt, mp = setup()
    x = batch()
    losses = []
    for _ in range(30):
        with mp.autocast():
            loss = model(x)
        mp.backward(loss)
        mp.step(opt)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    rows = {r["module"]: r for r in mp.describe().to_dicts()}
    assert rows["head"]["B/param"] == 8 and rows["head"]["optim"] == "bf16"
    assert rows["norm"]["B/param"] == 16
    assert all(v.dtype == torch.bfloat16 for st in opt.state.values() for k, v in st.items()
               if k != "step" and v.shape == model.head.weight.shape)


def test_the_fp32_weight_copies_are_not_saved_for_the_backward():
    """The ops save the stored bf16 weight (a parameter, alive anyway) and cast it up again in the
    backward: a forward saves exactly what the same model saves in fp32."""
    def saved(mode):
        model, _, mp = setup(mode)
        with ActivationMeter(model) as meter, mp.autocast():
            model(batch())
        return meter.total
    assert saved("bf16-storage") == saved("fp32") > 0


def test_no_fp32_weight_copy_outlives_the_forward():
    """Autograd keeps each saved tensor's pack hook until the backward: a hook that still held the
    boundary's copies kept every FP32 weight copy alive for the whole step (13 GB at pi0's size)."""
    import gc
    model, _, mp = setup()
    shapes = {tuple(p.shape) for p in model.parameters() if p.dtype == torch.bfloat16}
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}  # other tests'
    with mp.autocast():
        loss = model(batch())
    gc.collect()
    copies = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before
              and not isinstance(o, nn.Parameter) and o.dtype == torch.float32
              and tuple(o.shape) in shapes and o.requires_grad]
    assert copies == []
    mp.backward(loss)  # and the backward still gets what it saved
    assert all(p.grad is not None for p in model.parameters())


def test_a_policy_rule_and_other_update_methods_work_too():
    model, opt, mp = setup("fp32", rules={"head": "params=bf16,compute=fp32"},
                           update=UpdateSettings("kahan"))
    assert model.head.weight.dtype == torch.bfloat16 and model.conv.weight.dtype == torch.float32
    with mp.autocast():
        loss = model(batch())
    mp.backward(loss)
    mp.step(opt)
    assert mp.weights.state_bytes()["compensation"] == 2 * sum(p.numel() for p in model.head.parameters())
    assert Policy.parse("params=bf16,compute=fp32").compute == torch.float32


@pytest.mark.parametrize("update", ["master", "naive"])
def test_explicit_updates_override_the_modes_default(update):
    _, _, mp = setup(update=update)
    assert mp.settings.method == update


def test_the_bench_knows_bf16_storage_computes_in_fp32():
    """No "emulated here" note for bf16-storage on a CPU without native bf16, and no torch.amp
    baseline built for it (there is no low-precision compute to compare with)."""
    from vlamp.bench.run import compute_format, parse_modes

    assert compute_format("bf16-storage") == compute_format("bf16-storage/kahan") == "fp32"
    assert compute_format("bf16-mixed") == "bf16" and compute_format("fp16-true/kahan") == "fp16"
    modes, notes = parse_modes("bf16-storage,bf16-storage/kahan", device="cpu")
    assert modes == ["fp32", "bf16-storage", "bf16-storage/kahan"] and notes == []


def test_the_unmeasured_plan_names_the_storage_dtype():
    """bf16-storage computes in FP32 and stores in BF16: the reason said "stores weights in fp32"."""
    from vlamp.precision.autoplan import _unmeasured_reason
    from vlamp.precision.modes import get_mode

    assert "stores weights in bf16" in _unmeasured_reason(get_mode("bf16-storage"), None, False)
