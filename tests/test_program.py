"""The GPU program held to account from the CPU (`jaxbench.bench.program`), and XLA's FLOP count.

Every check is shown to pass on the trainer's programs *and* to fail on a planted fault:
a `lax.cond` in the scanned step, a host callback, a float32 convolution under bfloat16,
a state lowered without donation, an extra forward in the step, a second weight set scored
under one's name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import pytest

from jaxbench import configs, models, optim, train
from jaxbench.bench import flops, hlo, program

TINY_BF16 = configs.get_config("tiny").replace(precision="bfloat16")
SPEEDRUN = configs.get_config("speedrun")  # precision auto: bfloat16 for cuda, float32 on cpu
SMALL = dict(batch_size=16, eval_batch_size=16)  # FLOPs per image do not depend on the batch
R9_SMALL = dict(SMALL, ghost_bn=8)  # the preset's ghost groups of 32 do not fit batch 16


def _cond_ema(ema: Any, new: Any, step: jax.Array, cfg: configs.Config) -> Any:
    """The EMA update as it was before the select: a `lax.cond` (a plant)."""
    return jax.lax.cond(
        step % cfg.ema_every == 0, lambda: optim.ema_update(ema, new, cfg.ema_momentum), lambda: ema
    )


def _cond_lookahead(ema: Any, live: Any, step: jax.Array, cfg: configs.Config, total: int) -> Any:
    decays = jnp.asarray(optim.ema_decays(cfg, total))

    def update() -> tuple[Any, Any]:
        new = optim.ema_update(ema, live, decays[jnp.minimum(step, total)])
        return new, new

    return jax.lax.cond(step % cfg.ema_every == 0, update, lambda: (ema, live))


# --- the programs pass ---------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY_BF16, SPEEDRUN], ids=["tiny", "speedrun"])
def test_cuda_programs_pass(cfg: configs.Config) -> None:
    check = program.check_programs(cfg, "cuda")
    assert check["ok"], program.format_report(check)
    assert check["compute_dtype"] == "bf16"
    epoch, step, ev = (check["programs"][w] for w in ("epoch", "step", "eval"))
    assert epoch["loops"] == 1 and step["loops"] == 0
    assert epoch["donated"] == epoch["state_leaves"] == program.state_leaf_count(cfg)
    assert step["donated"] == step["state_leaves"]
    assert ev["state_leaves"] is None and ev["donated"] == 0  # evaluation donates nothing
    # every conv and matmul was read, all bfloat16
    assert epoch["convolutions"] >= 19 and epoch["dot_generals"] == 3
    assert set(epoch["operand_types"]["convolution"]) == {"bf16 x bf16"}
    assert set(epoch["operand_types"]["dot_general"]) == {"bf16 x bf16"}


def test_muon_programs_pass_with_newton_schulz_in_float32() -> None:
    """The step's float32 matmuls are Newton-Schulz's; its convolutions and the evaluation's
    head still read bfloat16, so a float32 conv under Muon fails as under SGD."""
    cfg = configs.get_config("speedrun_muon").replace(widths=(16, 32, 32))
    check = program.check_programs(cfg, "cuda")
    assert check["ok"], program.format_report(check)
    step, ev = check["programs"]["step"], check["programs"]["eval"]
    assert set(step["operand_types"]["convolution"]) == {"bf16 x bf16"}
    assert step["operand_types"]["dot_general"].get("f32 x f32", 0) > 0
    assert set(ev["operand_types"]["dot_general"]) == {"bf16 x bf16"}


@pytest.mark.parametrize("cfg", [configs.get_config("tiny"), SPEEDRUN], ids=["tiny", "speedrun"])
def test_cpu_programs_pass_in_float32(cfg: configs.Config) -> None:
    check = program.check_programs(cfg, "cpu")
    assert check["ok"], program.format_report(check)
    assert check["compute_dtype"] == "f32"
    assert set(check["programs"]["epoch"]["operand_types"]["convolution"]) == {"f32 x f32"}


def test_auto_precision_is_resolved_for_the_target() -> None:
    assert program.for_platform(SPEEDRUN, "cuda").precision == "bfloat16"
    assert program.for_platform(SPEEDRUN, "cpu").precision == "float32"
    assert program.for_platform(TINY_BF16, "cpu").precision == "bfloat16"  # explicit wins
    with pytest.raises(ValueError, match="platform"):
        program.for_platform(SPEEDRUN, "gpu")


# --- planted faults fail -----------------------------------------------------------------


def test_planted_cond_in_the_scanned_step_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optim, "maybe_ema_update", _cond_ema)
    f = program.check_program(TINY_BF16, "cuda", "epoch")
    assert not f["ok"]
    assert [c["in_loop"] for c in f["conditionals"]] == [True]
    assert any("inside the loop body" in p for p in f["problems"])
    # the per-step program has it outside any loop: still reported, still a failure
    s = program.check_program(TINY_BF16, "cuda", "step")
    assert [c["in_loop"] for c in s["conditionals"]] == [False]
    assert any("outside any loop" in p for p in s["problems"])


def test_planted_cond_in_lookahead_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optim, "lookahead_update", _cond_lookahead)
    f = program.check_program(SPEEDRUN, "cuda", "epoch")
    assert not f["ok"] and any("inside the loop body" in p for p in f["problems"])


def test_planted_host_callback_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    real = optim.maybe_ema_update

    def noisy(ema: Any, new: Any, step: jax.Array, cfg: configs.Config) -> Any:
        jax.debug.callback(lambda s: None, step)
        return real(ema, new, step, cfg)

    monkeypatch.setattr(optim, "maybe_ema_update", noisy)
    cpu = program.check_program(TINY_BF16, "cpu", "epoch")
    assert not cpu["ok"] and len(cpu["host_callbacks"]) == 1
    assert "in the loop body" in cpu["host_callbacks"][0]
    # a Python callback cannot be lowered for a GPU from here: that is a failure too
    cuda = program.check_program(TINY_BF16, "cuda", "epoch")
    assert not cuda["ok"] and "could not lower for cuda" in cuda["problems"][0]
    with pytest.raises(program.ProgramError):
        program.lower_program(TINY_BF16, "cuda")


def test_planted_float32_conv_under_bfloat16_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.ConvBN

    def leaky(*args: Any, **kw: Any) -> models.ConvBN:  # layer2 forgets the compute dtype
        if kw.get("name") == "layer2":
            kw["dtype"] = jnp.float32
        return real(*args, **kw)

    monkeypatch.setattr(models, "ConvBN", leaky)
    f = program.check_program(TINY_BF16, "cuda", "epoch")
    assert not f["ok"]
    # its forward, input gradient and weight gradient
    assert f["operand_types"]["convolution"]["f32 x f32"] == 3
    assert any("not in the compute dtype bf16 (3)" in p for p in f["problems"])


def test_lowering_without_donation_fails() -> None:
    text = program.lower_program(TINY_BF16, "cuda", "epoch", donate=False)
    f = hlo.inspect_program(
        text, jnp.bfloat16, state_leaves=program.state_leaf_count(TINY_BF16), expect_loop=True
    )
    assert not f["ok"] and f["donated"] == 0
    assert [p.split(":")[0] for p in f["problems"]] == ["state not donated"]


# --- the parser on texts written by hand ---------------------------------------------------

# jax 0.11 inlines the scanned step into the while; a conditional sits in its body
INLINED = """\
module @jit_epoch_fn {
  func.func public @main(%arg0: tensor<i32> {jax.buffer_donor = true} loc("state.step"), \
%arg1: tensor<3x3x3x8xf32> {jax.buffer_donor = true}, %arg2: tensor<4x32x32x3xui8>) \
-> (tensor<i32> {jax.result_info = "[0]"}) {
    %c = stablehlo.constant dense<0> : tensor<i32> loc(#loc)
    %0:2 = stablehlo.while(%iterArg = %arg0, %iterArg_1 = %arg1) : tensor<i32>, tensor<f32>
    cond {
      %1 = stablehlo.compare  LT, %iterArg, %c : (tensor<i32>, tensor<i32>) -> tensor<i1>
      stablehlo.return %1 : tensor<i1>
    } do {
      %2 = stablehlo.convolution(%x, %w) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f], \
window = {pad = [[1, 1], [1, 1]]} {batch_group_count = 1 : i64, feature_group_count = 1 : i64} \
: (tensor<4x32x32x3xbf16>, tensor<3x3x3x8xbf16>) -> tensor<4x32x32x8xbf16> loc(#loc7)
      %3 = "stablehlo.case"(%i) ({
        stablehlo.return %iterArg_1 : tensor<f32>
      }, {
        stablehlo.return %iterArg_1 : tensor<f32>
      }) : (tensor<i32>) -> tensor<f32> loc("jit(f)/cond")
      stablehlo.return %iterArg, %3 : tensor<i32>, tensor<f32>
    } loc(#loc3)
    %4 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0] \
: (tensor<4x8xf32>, tensor<8x10xbf16>) -> tensor<4x10xf32> loc("stablehlo.case")
    return %0#0 : tensor<i32>
  }
}
"""

# jax 0.10 calls the step from the loop; the callback and the conditional are in the callee
CALLED = """\
module @jit_epoch_fn {
  func.func public @main(%arg0: tensor<i32> {tf.aliasing_output = 0 : i32}, \
%arg1: tensor<8xf32>) -> (tensor<i32>) {
    %0:2 = stablehlo.while(%iterArg = %arg0, %iterArg_1 = %arg1) : tensor<i32>, tensor<8xf32>
    cond {
      %1 = stablehlo.compare  LT, %iterArg, %iterArg : (tensor<i32>, tensor<i32>) -> tensor<i1>
      stablehlo.return %1 : tensor<i1>
    } do {
      %5:2 = func.call @closed_call(%iterArg, %iterArg_1) : (tensor<i32>, tensor<8xf32>) -> \
(tensor<i32>, tensor<8xf32>)
      stablehlo.return %5#0, %5#1 : tensor<i32>, tensor<8xf32>
    }
    %9 = stablehlo.custom_call @Sharding(%0#0) : (tensor<i32>) -> tensor<i32>
    return %0#0 : tensor<i32>
  }
  func.func private @closed_call(%arg0: tensor<i32>, %arg1: tensor<8xf32>) -> \
(tensor<i32>, tensor<8xf32>) {
    %2 = call @helper(%arg0) : (tensor<i32>) -> tensor<i32>
    %3 = stablehlo.convolution(%x, %w) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f] \
: (tensor<4x8x8x8xf32>, tensor<3x3x8x8xf32>) -> tensor<4x8x8x8xf32>
    return %2, %arg1 : tensor<i32>, tensor<8xf32>
  }
  func.func private @helper(%arg0: tensor<i32>) -> tensor<i32> {
    %0 = stablehlo.custom_call @xla_ffi_python_gpu_callback(%arg0) {has_side_effect = true} \
: (tensor<i32>) -> tensor<i32>
    %1 = "stablehlo.if"(%p) ({
      stablehlo.return %arg0 : tensor<i32>
    }, {
      stablehlo.return %arg0 : tensor<i32>
    }) : (tensor<i1>) -> tensor<i32>
    return %1 : tensor<i32>
  }
}
"""


def test_parser_reads_an_inlined_loop_and_generic_ops() -> None:
    f = hlo.inspect_program(INLINED, jnp.bfloat16, state_leaves=2, expect_loop=True)
    assert f["loops"] == 1 and f["convolutions"] == 1 and f["dot_generals"] == 1
    # the quoted op is found, the location naming "stablehlo.case" is not
    assert [(c["op"], c["in_loop"]) for c in f["conditionals"]] == [("stablehlo.case", True)]
    assert f["donated"] == 2 and f["arguments"] == 3
    assert f["operand_types"]["dot_general"] == {"f32 x bf16": 1}
    problems = " | ".join(f["problems"])
    assert "conditional inside the loop body" in problems
    assert "dot_general at line" in problems and "reads f32 x bf16" in problems
    loose = hlo.inspect_program(INLINED, "bf16", dots_in_compute_dtype=False)
    assert not any("compute dtype" in p for p in loose["problems"])


def test_parser_follows_calls_from_the_loop_body() -> None:
    f = hlo.inspect_program(CALLED, jnp.float32, state_leaves=2, expect_loop=True)
    assert [(c["op"], c["function"], c["in_loop"]) for c in f["conditionals"]] == [
        ("stablehlo.if", "helper", True)
    ]
    assert f["custom_calls"] == {"Sharding": 1, "xla_ffi_python_gpu_callback": 1}
    assert len(f["host_callbacks"]) == 1 and "in the loop body" in f["host_callbacks"][0]
    assert f["donated"] == 1
    assert any("1 of 2 state leaves" in p and "%arg1" in p for p in f["problems"])


def test_a_text_the_parser_cannot_read_fails() -> None:
    f = hlo.inspect_program("module {}\n", jnp.bfloat16, state_leaves=3, expect_loop=True)
    assert not f["ok"]
    assert any("no stablehlo.convolution" in p for p in f["problems"])
    assert any("no stablehlo.while" in p for p in f["problems"])
    assert any("fewer than the 3 state leaves" in p for p in f["problems"])


# --- FLOPs ---------------------------------------------------------------------------------


class _Fake:
    def __init__(self, analysis: Any) -> None:
        self.analysis = analysis

    def cost_analysis(self) -> Any:
        return self.analysis


def test_executed_flops_reads_a_dict_or_a_list() -> None:
    assert program.executed_flops(_Fake({"flops": 6.0, "bytes accessed": 1.0})) == 6.0
    assert program.executed_flops(_Fake([{"flops": 2.0}, {"flops": 3.0}])) == 5.0
    for bad in (None, {}, [{"bytes accessed": 1.0}], {"flops": -1.0}):
        with pytest.raises(ValueError, match="FLOP count"):
            program.executed_flops(_Fake(bad))


def test_cost_analysis_counts_a_while_body_once() -> None:
    """Why the accounting compiles the step, not the scan (see `executed_flops`)."""

    def scan(x: jax.Array, n: int) -> jax.Array:
        return jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=n)[0]

    x = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    one, three = (
        program.executed_flops(jax.jit(scan, static_argnums=1).lower(x, n).compile())
        for n in (1, 3)
    )
    assert one == pytest.approx(2 * 32**3, rel=1e-3) and three == pytest.approx(one, rel=1e-3)


@pytest.mark.parametrize("name", ["tiny", "resnet9", "speedrun"])
def test_conv_layers_agree_with_the_count(name: str) -> None:
    cfg = configs.get_config(name)
    counted = dict(flops.layer_flops(cfg))
    layers = flops.conv_layers(cfg)
    assert [n for n, *_ in layers] + ["head"] == list(counted)
    for n, k, ci, co, size, pad, _ in layers:
        out = size + 2 * pad - k + 1
        assert flops.conv_flops(k, ci, co, out, out) == counted[n]
        assert flops.conv_flops_unpadded(k, ci, co, size, pad) <= counted[n]


def test_unpadded_count_by_hand() -> None:
    assert flops.valid_taps(32, 3, 1) == 32 * 3 - 2
    assert flops.valid_taps(4, 3, 1) == 10
    assert flops.valid_taps(32, 2, 0) == 31 * 2  # VALID: every tap reads the input
    r9 = configs.get_config("myrtle24")
    assert flops.unpadded_forward_flops_per_image(r9) == 657_255_936  # 0.866 of 758_523_904
    # 3x forward, less prep's input gradient
    prep = flops.conv_flops_unpadded(3, 3, 64, 32, 1)
    assert flops.unpadded_train_flops_per_image(r9) == 3 * 657_255_936 - prep
    sr = configs.get_config("speedrun")
    whiten = flops.conv_flops_unpadded(2, 3, 24, 32, 0)  # frozen: forward only
    fwd = flops.unpadded_forward_flops_per_image(sr)
    assert flops.unpadded_train_flops_per_image(sr) == 3 * fwd - 2 * whiten
    assert flops.valid_taps(7, 3, 1, used=6) == 7 * 3 - 2 - 2  # the last output's 2 taps go
    assert flops.read_outputs(sr) == {"block1.conv1": 30, "block2.conv1": 14, "block3.conv1": 6}
    assert flops.read_outputs(r9) == {}
    skipped = sum(
        flops.conv_flops_unpadded(k, ci, co, n, p) - flops.conv_flops_unpadded(k, ci, co, n, p, u)
        for name, k, ci, co, n, p, _ in flops.conv_layers(sr)
        if (u := flops.read_outputs(sr).get(name)) is not None
    )
    assert flops.unpadded_train_flops_per_image(sr, read_only=True) == (
        flops.unpadded_train_flops_per_image(sr) - 3 * skipped  # forward and both gradients
    )


@pytest.fixture(scope="module")
def resnet9_compiled() -> dict[str, Any]:
    """ResNet-9 at its preset widths, batch 16: the step and an eval batch with the EMA."""
    cfg = configs.get_config("resnet9").replace(**R9_SMALL)
    p = program.build_pieces(cfg)
    step, step_args = program.program_fn(p, "step")
    ev, ev_args = program.program_fn(p, "eval")
    return {
        "cfg": cfg,
        "step": step.lower(*step_args).compile(),
        "eval": ev.lower(*ev_args).compile(),
    }


def test_resnet9_flop_ratios(resnet9_compiled: dict[str, Any]) -> None:
    c = resnet9_compiled
    acc = program.flop_accounting_from_compiled(c["cfg"], c["step"], 16, c["eval"], 16, 2)
    assert program.flop_problems(acc) == [], program.format_report(acc=acc)
    assert acc["train_ratio"] == pytest.approx(0.873, abs=0.02)
    assert acc["eval_ratio"] == pytest.approx(0.869, abs=0.02)
    # the rest of the gap is the non-matmul work: a few percent over XLA's convention
    assert 1.0 <= acc["train_unpadded_ratio"] <= 1.04
    assert 1.0 <= acc["eval_unpadded_ratio"] <= 1.04
    assert acc["train_read_only_ratio"] == acc["train_unpadded_ratio"]  # every output is read
    assert acc["backend"] == "cpu" and acc["eval_weight_sets"] == 2


def test_speedrun_flop_accounting() -> None:
    acc = program.flop_accounting(SPEEDRUN, batch_size=16, eval_batch=16)
    assert program.flop_problems(acc) == [], program.format_report(acc=acc)
    # XLA may skip conv outputs that the floor pools never read, and skips some of them:
    # between "all skipped" and "none skipped" plus the non-matmul few percent
    assert acc["train_read_only_ratio"] >= 1.0
    assert acc["train_unpadded_ratio"] <= 1.04
    assert 1.0 <= acc["eval_unpadded_ratio"] <= 1.05
    assert acc["train_counted_per_image"] == flops.train_flops_per_image(SPEEDRUN)


def test_planted_second_weight_set_leaves_the_eval_bound(
    resnet9_compiled: dict[str, Any],
) -> None:
    """The eval batch scores the net and its EMA: accounted as one weight set, it is ~2x."""
    c = resnet9_compiled
    acc = program.flop_accounting_from_compiled(c["cfg"], c["step"], 16, c["eval"], 16, 1)
    assert acc["eval_ratio"] > 1.6
    assert [p.split()[0] for p in program.flop_problems(acc)] == ["eval"]


def test_planted_second_forward_leaves_the_train_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    real = train.make_loss_fn

    def twice(cfg: configs.Config, model: Any) -> Any:
        loss_fn = real(cfg, model)

        def planted(
            params: Any, stats: Any, images: jax.Array, labels: jax.Array, jitter: Any = None
        ) -> Any:
            loss, (_, new_stats) = loss_fn(params, stats, images, labels, jitter)
            # a second forward (of the mirrored batch, so XLA cannot merge the two)
            _, (logits, _) = loss_fn(params, stats, images[:, :, ::-1], labels, jitter)
            return loss, (logits, new_stats)

        return planted

    monkeypatch.setattr(train, "make_loss_fn", twice)
    cfg = configs.get_config("resnet9").replace(**R9_SMALL)
    p = program.build_pieces(cfg)
    step, args = program.program_fn(p, "step")
    acc = program.flop_accounting_from_compiled(cfg, step.lower(*args).compile(), 16)
    assert acc["train_ratio"] > program.RATIO_BOUNDS["train"][1] + 0.1
    assert [p.split()[0] for p in program.flop_problems(acc)] == ["train"]


def test_flop_check_judges_the_preset_widths_only() -> None:
    """The ratios measured on a narrow speedrun (16,32,32: eval 1.106, outside the bounds
    from its uncounted elementwise share) are recorded there, judged at the preset's widths."""
    acc = {"train_ratio": 0.97, "eval_ratio": 1.106}
    narrow = program.flop_check(SPEEDRUN.replace(widths=(16, 32, 32)), acc)
    assert narrow["status"] == "skipped" and narrow["problems"] == []
    assert narrow["detail"].startswith("bounds hold at the preset's widths 64,256,256, not at")
    assert narrow["eval_ratio"] == 1.106
    full = program.flop_check(SPEEDRUN, acc)
    assert full["status"] == "failed" and [p.split()[0] for p in full["problems"]] == ["eval"]
    assert program.flop_check(SPEEDRUN, dict(acc, eval_ratio=0.88))["status"] == "passed"
    wider = program.flop_check(SPEEDRUN.replace(widths=(64, 256, 512)), acc)
    assert wider["status"] == "failed"  # a wider net's elementwise share is smaller still
    custom = program.flop_check(SPEEDRUN.replace(name="mine", widths=(16, 32, 32)), acc)
    assert custom["status"] == "failed"  # no preset to compare with: judged as it is


def test_format_report() -> None:
    check = program.check_programs(TINY_BF16, "cuda", ("epoch",))
    acc = {
        "backend": "cpu",
        "train_executed_per_image": 2.0e9,
        "train_counted_per_image": 2.2e9,
        "train_ratio": 0.9,
        "train_unpadded_ratio": 1.01,
        "eval_executed_per_image": None,
    }
    text = program.format_report(check, acc)
    assert "program check tiny for cuda (bf16): ok" in text
    assert "110/110 state leaves donated" in text
    assert "train: 2.0000 / 2.2000 GFLOP = 0.900" in text
