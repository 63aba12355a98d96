"""``vlamp plan``: the resolved precision plan of a model, as the describe table."""

from __future__ import annotations

import argparse
import json
import sys

from vlamp.models.config import SIZES
from vlamp.models.hf import PRESETS as HF_PRESETS
from vlamp.precision import MODE_NAMES, PrecisionPlan, describe_plan
from vlamp.precision.weight_update import UPDATES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="show which precision every module runs in (--auto: measured on this machine)",
        description="Resolve a precision plan (a mode plus rules) over TinyVLA, the default model, and "
                    "print, per module: parameter storage, compute, output, gradient and "
                    "optimizer-state dtype, parameter count and the deciding rule. With --auto, first "
                    "time every low-precision module's forward+backward in low precision and in FP32 "
                    "on a batch of the default shapes, keep FP32 where low precision is slower here, "
                    "and (for mode auto) take the low-precision mode only if its whole step is faster. "
                    "The measured plan is cached per machine, torch version, threads, model and batch "
                    "shape; `vlamp train` uses the same cache.",
        epilog="examples:\n  vlamp plan --depth 2\n  vlamp plan --auto --out plan.yaml\n"
               "  vlamp plan model.name=hf-vlm model.size=smolvla train.lora.rank=16 "
               "'train.lora.targets=[Linear]' --mode bf16-storage --depth 0\n"
               "  vlamp plan --fsdp --depth 1\n"
               "  vlamp plan --auto --mode bf16-mixed --batch-size 32 --refresh",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default=None, help=f"one of {', '.join(MODE_NAMES)}, auto "
                                                 "(default: bf16-mixed; with --auto: auto)")
    p.add_argument("--auto", action="store_true",
                   help="measure the plan on this machine (a few seconds; cached)")
    p.add_argument("--batch-size", type=int, default=64, help="batch for --auto (default: 64, as "
                                                              "`vlamp train`)")
    p.add_argument("--refresh", action="store_true", help="with --auto: measure again, ignore the cache")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the plan as YAML (usable as precision.rules / --rules)")
    p.add_argument("--rules", default=None, metavar="FILE",
                   help="YAML rules file: {builtin_rules: bool, rules: [{pattern, policy}]}")
    p.add_argument("--no-builtin-rules", action="store_true",
                   help="drop the built-in FP32 islands (norms, embeddings, action output, loss)")
    p.add_argument("--head", default=None, choices=("act", "flow"),
                   help="TinyVLA's action head (default: act)")
    p.add_argument("--size", default=None, choices=tuple(SIZES),
                   help="TinyVLA's size preset, as model.size (default: small)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side for --auto's batch (default: 64; 128 for base and large)")
    p.add_argument("--device", default="auto",
                   help="where --auto measures and mode auto decides for: auto (CUDA when present), "
                        "cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--depth", type=int, default=None, help="fold modules deeper than this")
    p.add_argument("--sensitivity", type=float, default=None, metavar="ERROR",
                   help="measure each module's relative error in low precision against fp32 on a "
                        "batch and keep in fp32 those above ERROR (e.g. 0.02), instead of the "
                        "built-in islands; with --auto, the speed measurement follows")
    p.add_argument("--lean-islands", type=float, default=0.25, metavar="FRACTION",
                   help="with --auto: let the FP32 islands hand on the low-precision dtype where "
                        "that grows the gradient error against fp32 by at most FRACTION, measured "
                        "(precision.lean_islands; default: 0.25; 0: every island hands on fp32)")
    p.add_argument("--fsdp", action="store_true",
                   help="also list the FSDP2 shard groups the plan gives under torchrun "
                        "(distributed.strategy=fsdp): each group's gathered and reduced dtype")
    p.add_argument("--model", default=None, metavar="PRESET|CONFIG",
                   help="describe a Hugging Face transformers model instead of TinyVLA: a preset "
                        f"({', '.join(HF_PRESETS)}) or a local config.json (or its directory); built "
                        "on the meta device, so nothing is allocated or downloaded. Needs "
                        'pip install "vlamp[hf]"')
    p.add_argument("--update", default="auto", choices=("auto", *UPDATES),
                   help="how a -true or -storage mode updates its low-precision weights "
                        "(precision.update): decides the optimizer state's dtype and the bytes "
                        "per parameter shown (default: auto, the mode's own: FP32 masters in "
                        "-true modes, stochastic rounding in bf16-storage)")
    p.add_argument("--optimizer-state", default="auto", choices=("auto", "8bit"),
                   help="the optimizer's moments (precision.optimizer_state): auto, the update "
                        "method's dtype, or 8bit (block-wise quantized, ~1 byte per moment)")
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="the run's model and what it trains, as vlamp train takes them: model.* "
                        "(model.name=hf-vlm model.size=smolvla: built on the meta device, nothing "
                        "allocated, unless --auto, --sensitivity or --fsdp run it), train.freeze, "
                        "train.lora.*; frozen modules show no gradient and no optimizer state")
    p.set_defaults(run=run, allow_extra=True)


def run(args: argparse.Namespace) -> int:
    from vlamp.precision.autoplan import measure_plan
    from vlamp.precision.errors import VlampError
    from vlamp.precision.hardware import resolve_device
    from vlamp.precision.modes import get_mode

    if args.batch_size < 1:
        raise VlampError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    mode = args.mode or ("auto" if args.auto else "bf16-mixed")
    if mode == "auto" and not args.auto:
        mode = get_mode("auto", device).name  # the hardware table, for the device asked about
    model, frozen = _model(args, device)
    if args.rules:
        plan = PrecisionPlan.load(args.rules, mode=None if mode == "auto" else mode)
        if args.no_builtin_rules:
            plan.builtin_rules = False
    else:
        plan = PrecisionPlan(mode, builtin_rules=not args.no_builtin_rules)
    plan.resolve(model)  # warns (one line, by vlamp's main) about rules that match nothing
    if args.sensitivity is not None and args.sensitivity <= 0:
        raise VlampError(f"--sensitivity must be a relative error > 0, got {args.sensitivity}")
    if not args.lean_islands >= 0:
        raise VlampError(f"--lean-islands must be a fraction >= 0 (0: off), got {args.lean_islands}")
    if args.sensitivity is not None and not args.auto:
        from vlamp.precision.sensitivity import sensitivity_plan

        if plan.mode.name == "fp32":
            raise VlampError("--sensitivity needs a low-precision --mode (fp32 has no error to measure)")
        accurate, errors = sensitivity_plan(model, model.example_batch(args.batch_size), plan.mode,
                                            threshold=args.sensitivity)
        plan = PrecisionPlan(plan.mode, [*plan.user_rules, *accurate.user_rules], builtin_rules=False)
        if not args.json:
            _print_errors(errors, args.sensitivity)
    if args.auto:
        plan = measure_plan(model, model.example_batch(args.batch_size), mode,
                            rules=plan.user_rules, builtin_rules=plan.builtin_rules,
                            refresh=args.refresh, log=lambda line: print(line, file=sys.stderr),
                            sensitivity=args.sensitivity, lean=args.lean_islands or None,
                            freeze=frozen)
    from vlamp.precision.freeze import with_frozen

    # frozen modules stored as MixedPrecision stores them at setup (not in the plan --out writes)
    table = describe_plan(with_frozen(plan, frozen), model, max_depth=args.depth,
                          update=args.update, state8=args.optimizer_state == "8bit")
    print(json.dumps(table.to_dicts(), indent=2) if args.json else table)
    if frozen and not args.json:
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{trained:,} of {total:,} parameters trained ({100 * trained / total:.2f}%), "
              f"the rest frozen")
    if plan.measured and plan.measured.get("step_ms") and not args.json:
        steps = ", ".join(f"{k} {v:.1f} ms" for k, v in plan.measured["step_ms"].items())
        print(f"measured forward+backward step at batch {args.batch_size}: {steps}")
    if args.fsdp and not args.json:
        _print_shard_groups(plan, model)
    if args.out:
        try:
            plan.save(args.out)
        except OSError as e:
            raise VlampError(f"--out {args.out!r}: cannot write ({e.strerror})") from None
        print(f"plan written to {args.out} (use it with precision.rules={args.out})", file=sys.stderr)
    return 0


def _model(args: argparse.Namespace, device):
    """The model the plan is described on (a transformers config on the meta device, the run
    config's model, or TinyVLA), and the names of its frozen modules."""
    from vlamp.models.config import ModelConfig, with_size
    from vlamp.models.tinyvla import TinyVLA
    from vlamp.models.tokenizer import WordTokenizer
    from vlamp.precision.errors import VlampError
    from vlamp.sim.tasks import DEFAULT_SUITE, TASKS

    overrides = [*args.overrides, *getattr(args, "extra", [])]
    if args.model:
        if args.auto or args.sensitivity is not None or args.fsdp or overrides:
            raise VlampError("--model describes a transformers model's plan; --auto, --sensitivity, "
                             "--fsdp and run config keys need vlamp's models (they run the model)")
        from vlamp.models.hf import build_hf_model

        return build_hf_model(args.model, device="meta"), []
    vocab = len(WordTokenizer.build(TASKS[t].instruction for t in DEFAULT_SUITE))
    if overrides:
        return _run_model(args, overrides, vocab, device)
    size = args.size or "small"
    image_size = args.image_size or (64 if size == "small" else 128)
    shape = with_size({"size": size, "vocab_size": vocab, "head": args.head or "act",
                       "image_size": image_size})
    return TinyVLA(ModelConfig(**shape)).to(device), []


def _run_model(args: argparse.Namespace, overrides: list[str], vocab: int, device):
    """The model a ``vlamp train`` with ``overrides`` builds, adapted and frozen as it trains it;
    on the meta device unless a flag runs it."""
    import torch

    from vlamp.models.lora import adapt
    from vlamp.models.registry import build_model
    from vlamp.precision.errors import VlampError
    from vlamp.precision.freeze import freeze
    from vlamp.train.config_io import load_config

    if args.size or args.head or args.image_size:
        raise VlampError("give the model's shape as config keys (model.size=, model.head=, "
                         "model.image_size=) beside other config keys, not as --size, --head, "
                         "--image-size")
    config = load_config(None, overrides)
    if not config.model.vocab_size:
        config.model.vocab_size = vocab
    runs = args.auto or args.sensitivity is not None or args.fsdp
    with torch.device(device if runs else "meta"):
        model = build_model(config.model)
        bases = adapt(model, config.train.lora)
    return model, list(freeze(model, [*config.train.freeze, *bases]))


def _print_shard_groups(plan: PrecisionPlan, model) -> None:
    """The FSDP2 shard groups the plan makes of ``model``."""
    import torch

    from vlamp.precision.apply import apply_plan
    from vlamp.precision.fsdp import plan_groups

    resolved = plan.resolve(model, warn_unmatched=False)
    apply_plan(resolved)
    groups = [g for g, _ in plan_groups(model, resolved)]
    print(f"\nFSDP2 shard groups ({len(groups)}), as `torchrun ... vlamp train "
          f"distributed.strategy=fsdp` shards this plan:")
    for g in groups:
        print(f"  {g.line()}")
    low = sum(g.num_params for g in groups if g.param_dtype != torch.float32)
    print(f"{low:,} of {sum(g.num_params for g in groups):,} parameters travel in low precision")


def _print_errors(errors: dict, threshold: float, top: int = 12) -> None:
    """The modules with the largest low-precision error, and how many passed ``threshold``."""
    ranked = sorted(errors.items(), key=lambda kv: -max(kv[1]["output_error"], kv[1]["grad_error"]))
    kept = sum(1 for _, r in ranked if r["kept_fp32"])
    print(f"relative error in low precision against fp32, per module ({kept} of {len(ranked)} above "
          f"{threshold:g}, kept in fp32):")
    for name, r in ranked[:top]:
        mark = "  fp32" if r["kept_fp32"] else ""
        print(f"  {name:40s} {r['class']:24s} output {r['output_error']:.1e}  gradient "
              f"{r['grad_error']:.1e}{mark}")
    print()
