"""Counted FLOPs per image for the configured model, so the benchmark can report a FLOP rate.

Convention (the usual one in papers and in the airbench/Myrtle write-ups):
  * only convolutions and linear layers are counted; BatchNorm, ReLU, pooling,
    the residual additions, the loss and the optimizer update are ignored
    (together well under 1% of the total for ResNet-9);
  * one multiply-add is 2 FLOPs, so a k x k convolution from c_in to c_out
    channels with an H x W output costs 2 * k * k * c_in * c_out * H * W, and a
    linear layer 2 * d_in * d_out;
  * a training step costs 3x the forward pass (forward, then the gradients with
    respect to the activations and to the weights, each about one forward);
  * an evaluation costs one forward per view: 1 without TTA, 2 with flip TTA,
    6 with `tta_shift` (airbench's three translations, each mirrored).

The figures are *counted* from the architecture, not measured, so the FLOP rate
that the benchmark derives from them is comparable across frameworks and cards.
This module is pure Python (no JAX, no PyTorch).
"""

from __future__ import annotations

from jaxbench.configs import Config
from jaxbench.stream import IMAGE_SIZE

TRAIN_FORWARD_MULTIPLIER = 3
NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100}


def conv_flops(k: int, c_in: int, c_out: int, h: int, w: int) -> int:
    """FLOPs of one k x k convolution with an h x w output (2 per multiply-add)."""
    return 2 * k * k * c_in * c_out * h * w


def linear_flops(d_in: int, d_out: int) -> int:
    """FLOPs of one dense layer (2 per multiply-add)."""
    return 2 * d_in * d_out


def layer_flops(cfg: Config) -> list[tuple[str, int]]:
    """Forward FLOPs per image of every counted layer, named as the model's modules."""
    if cfg.model == "resnet9":
        return _resnet9(cfg)
    if cfg.model == "speedrun":
        return _speedrun(cfg)
    raise ValueError(f"no FLOP count for --model {cfg.model}; add it to jaxbench/bench/flops.py")


def _resnet9(cfg: Config) -> list[tuple[str, int]]:
    """ResNet-9 (docs/design.md): each `layer*` convolves at the incoming resolution and
    then max-pools by 2, so its conv runs at the larger size; residual convs follow the pool.
    """
    w0, w1, w2, w3 = cfg.widths
    s = IMAGE_SIZE  # 32: prep and layer1's conv run here
    if cfg.whiten == "patch3":  # Page's stem: frozen 3x3 whitening to 27 channels, then 1x1
        prep = [
            ("prep.whiten", conv_flops(3, 3, 27, s, s)),
            ("prep.conv", conv_flops(1, 27, w0, s, s)),
        ]
    else:
        prep = [("prep", conv_flops(3, 3, w0, s, s))]
    return [
        *prep,
        ("layer1", conv_flops(3, w0, w1, s, s)),
        ("res1a", conv_flops(3, w1, w1, s // 2, s // 2)),
        ("res1b", conv_flops(3, w1, w1, s // 2, s // 2)),
        ("layer2", conv_flops(3, w1, w2, s // 2, s // 2)),
        ("layer3", conv_flops(3, w2, w3, s // 4, s // 4)),
        ("res3a", conv_flops(3, w3, w3, s // 8, s // 8)),
        ("res3b", conv_flops(3, w3, w3, s // 8, s // 8)),
        ("head", linear_flops(w3, NUM_CLASSES[cfg.dataset])),
    ]


def _speedrun(cfg: Config) -> list[tuple[str, int]]:
    """airbench94's net (jaxbench/speedrun_model.py): a 2x2 VALID whitening conv 3 -> 24
    (32 -> 31), then per block conv1 at the incoming size, pool 2 (floor), conv2 after it;
    a final pool 3 leaves 1x1 for the head.
    """
    whiten = 2 * 3 * 4  # concat(W, -W) of the 2x2x3 patch eigenvectors
    s = IMAGE_SIZE - 1
    out = [("whiten", conv_flops(2, 3, whiten, s, s))]
    c_in = whiten
    for i, w in enumerate(cfg.widths, start=1):
        out.append((f"block{i}.conv1", conv_flops(3, c_in, w, s, s)))
        s //= 2
        out.append((f"block{i}.conv2", conv_flops(3, w, w, s, s)))
        c_in = w
    s //= 3
    out.append(("head", linear_flops(c_in * s * s, NUM_CLASSES[cfg.dataset])))
    return out


def eval_forwards(cfg: Config) -> int:
    """Forward passes per test image: 1, 2 with flip TTA, 6 with flip + shifted views."""
    if not cfg.tta:
        return 1
    return 6 if cfg.tta_shift else 2


def forward_flops_per_image(cfg: Config) -> int:
    """Counted forward FLOPs for one image (0.7585 GFLOP for the default ResNet-9)."""
    return sum(f for _, f in layer_flops(cfg))


def train_flops_per_image(cfg: Config) -> int:
    """Counted FLOPs to train on one image: forward + backward = 3x forward."""
    return TRAIN_FORWARD_MULTIPLIER * forward_flops_per_image(cfg)


def eval_flops_per_image(cfg: Config) -> int:
    """Counted FLOPs to evaluate one test image (one forward per TTA view)."""
    return eval_forwards(cfg) * forward_flops_per_image(cfg)


CONVENTION = (
    "conv and linear layers only, 2 FLOPs per multiply-add (conv: 2*k*k*c_in*c_out*H_out*W_out); "
    "training = 3x forward; evaluation = 1 forward per TTA view (2 flip, 6 flip+shift)"
)


# --- XLA's convention: what a compiled program's cost analysis should report ---------------
#
# XLA's HloCostAnalysis counts a convolution as 2 FLOPs per multiply-add that reads the
# *input*: taps that fall on the zero padding are not counted. The count above includes
# them (as GPUs execute them), so a 3x3 "same" convolution at 32x32 is counted (32/30.67)^2
# ~ 4% higher than XLA reports, and 43% higher at 4x4. XLA's program for a training step
# also leaves out what autodiff never builds: the input gradient of the first convolution
# (its input is the data) and the weight gradient of a frozen kernel (speedrun's whitening).
# These functions model that, so a compiled program can be checked to within the few
# percent of non-matmul work (BN, activations, pooling, loss, optimizer) it adds.


def valid_taps(size: int, k: int, pad: int, used: int | None = None) -> int:
    """Kernel taps that land inside an input axis of `size`, summed over the output positions
    of a stride-1 convolution padded by `pad` on each side (size * k without padding loss);
    over the first `used` outputs only, when given."""
    out = size + 2 * pad - k + 1
    return sum(1 for o in range(out if used is None else used) for j in range(k)
               if 0 <= o + j - pad < size)  # fmt: skip


def conv_flops_unpadded(
    k: int, c_in: int, c_out: int, size: int, pad: int, used: int | None = None
) -> int:
    """FLOPs of a square stride-1 k x k convolution over a size x size input, counting only the
    multiply-adds that read the input (XLA's count; its gradients cost the same); with
    `used`, only the first `used` output rows and columns."""
    return 2 * c_in * c_out * valid_taps(size, k, pad, used) ** 2


def conv_layers(cfg: Config) -> list[tuple[str, int, int, int, int, int, bool]]:
    """(name, k, c_in, c_out, input size, pad, trained) of every convolution, input first.

    The same layers as `layer_flops` (a test checks that the two agree); `trained` is False
    for a whitening kernel, which the optimizer never updates (`optim.param_labels`).
    """
    s = IMAGE_SIZE
    if cfg.model == "resnet9":
        w0, w1, w2, w3 = cfg.widths
        prep = [("prep", 3, 3, w0, s, 1, True)]
        if cfg.whiten == "patch3":
            prep = [("prep.whiten", 3, 3, 27, s, 1, False), ("prep.conv", 1, 27, w0, s, 0, True)]
        return [
            *prep,
            ("layer1", 3, w0, w1, s, 1, True),
            ("res1a", 3, w1, w1, s // 2, 1, True),
            ("res1b", 3, w1, w1, s // 2, 1, True),
            ("layer2", 3, w1, w2, s // 2, 1, True),
            ("layer3", 3, w2, w3, s // 4, 1, True),
            ("res3a", 3, w3, w3, s // 8, 1, True),
            ("res3b", 3, w3, w3, s // 8, 1, True),
        ]
    if cfg.model == "speedrun":
        out = [("whiten", 2, 3, 24, s, 0, False)]
        s, c_in = s - 1, 24
        for i, w in enumerate(cfg.widths, start=1):
            out.append((f"block{i}.conv1", 3, c_in, w, s, 1, True))
            s //= 2
            out.append((f"block{i}.conv2", 3, w, w, s, 1, True))
            c_in = w
        return out
    raise ValueError(f"no FLOP count for --model {cfg.model}; add it to jaxbench/bench/flops.py")


def _head_flops(cfg: Config) -> int:
    return dict(layer_flops(cfg))["head"]


def unpadded_forward_flops_per_image(cfg: Config) -> int:
    """Forward FLOPs per image as XLA counts them (no padding taps); head included."""
    convs = sum(conv_flops_unpadded(k, ci, co, n, p) for _, k, ci, co, n, p, _ in conv_layers(cfg))
    return convs + _head_flops(cfg)


def read_outputs(cfg: Config) -> dict[str, int]:
    """Convolutions whose last output row and column nothing reads, and how many are read:
    speedrun's conv1 at an odd size (31, 15, 7) feeds a 2x2 pool that floors."""
    if cfg.model != "speedrun":
        return {}
    return {name: n // 2 * 2 for name, k, _, _, n, p, _ in conv_layers(cfg)
            if name.endswith("conv1") and (n + 2 * p - k + 1) % 2}  # fmt: skip


def unpadded_train_flops_per_image(cfg: Config, read_only: bool = False) -> int:
    """Training FLOPs per image as XLA builds and counts them: every forward, the input
    gradient of every convolution with something trainable before it, the weight gradient
    of every trained kernel, and the head 3x (its input and weight gradients are both
    needed). Page's frozen whitening conv has nothing trainable before or in it, so the 1x1
    conv after it needs no input gradient either; speedrun's has a trained bias.

    `read_only`: the least XLA may do, skipping the outputs nothing reads
    (`read_outputs`); it skips part of them (speedrun, XLA:CPU: 2.6% of the train step).
    """
    total = 3 * _head_flops(cfg)
    upstream = False  # a trained parameter before this layer: its input gradient is needed
    used = read_outputs(cfg) if read_only else {}
    for name, k, ci, co, n, p, trained in conv_layers(cfg):
        f = conv_flops_unpadded(k, ci, co, n, p, used.get(name))
        total += f * (1 + upstream + trained)
        upstream = upstream or trained or cfg.whiten == "patch2"  # patch2: the whitening bias
    return total


def unpadded_eval_flops_per_image(cfg: Config) -> int:
    """Evaluation FLOPs per image (one weight set, every TTA view) as XLA counts them."""
    return eval_forwards(cfg) * unpadded_forward_flops_per_image(cfg)
