"""Counted FLOPs per image, so the benchmark can report a FLOP rate (pure Python).

The usual convention (papers, airbench, Myrtle): conv and linear layers only (the rest is
under 1% for ResNet-9), 2 FLOPs per multiply-add, training 3x the forward pass, evaluation
one forward per TTA view. Counted, not measured, so comparable across frameworks.
"""

from __future__ import annotations

from jaxbench.configs import Config
from jaxbench.stream import IMAGE_SIZE

TRAIN_FORWARD_MULTIPLIER = 3
NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100}


def conv_flops(k: int, c_in: int, c_out: int, h: int, w: int) -> int:
    """FLOPs of one k x k convolution with an h x w output (2 per multiply-add)."""
    return 2 * k * k * c_in * c_out * h * w


def layer_flops(cfg: Config) -> list[tuple[str, int]]:
    """Forward FLOPs per image of every counted layer, named as the model's modules."""
    convs = [
        (name, conv_flops(k, c_in, c_out, n + 2 * pad - k + 1, n + 2 * pad - k + 1))
        for name, k, c_in, c_out, n, pad, _ in conv_layers(cfg)
    ]
    return [*convs, ("head", _head_flops(cfg))]


def eval_forwards(cfg: Config) -> int:
    """Forward passes per test image: 1, 2 with flip TTA, 6 with flip + shifted views."""
    return (6 if cfg.tta_shift else 2) if cfg.tta else 1


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
# XLA counts only the multiply-adds that read the input (not the zero padding: a 3x3 "same"
# conv at 32x32 is ~4% under the count above, 43% at 4x4) and only what autodiff builds (no
# input gradient of the first conv, no weight gradient of a frozen kernel).


def valid_taps(size: int, k: int, pad: int, used: int | None = None) -> int:
    """Kernel taps inside an input axis of `size`, summed over the outputs of a stride-1 conv
    padded by `pad` (over the first `used` outputs only, when given)."""
    out = size + 2 * pad - k + 1
    return sum(1 for o in range(out if used is None else used) for j in range(k)
               if 0 <= o + j - pad < size)  # fmt: skip


def conv_flops_unpadded(
    k: int, c_in: int, c_out: int, size: int, pad: int, used: int | None = None
) -> int:
    """FLOPs of a square stride-1 conv counting only the multiply-adds that read the input
    (XLA's count; each gradient costs the same), over `used` output rows and columns."""
    return 2 * c_in * c_out * valid_taps(size, k, pad, used) ** 2


def conv_layers(cfg: Config) -> list[tuple[str, int, int, int, int, int, bool]]:
    """(name, k, c_in, c_out, input size, pad, trained) of every convolution, input first;
    `trained` is False for a whitening kernel (`optim.param_labels` freezes it)."""
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
    # both nets end at 1x1 (speedrun: a flooring pool 3 of 3x3), so the dense head reads
    # widths[-1]; 2 FLOPs per multiply-add
    return 2 * cfg.widths[-1] * NUM_CLASSES[cfg.dataset]


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
    """Training FLOPs per image as XLA builds them: forwards, input gradients after anything
    trained (speedrun's whitening bias too), trained kernels' weight gradients, the head 3x;
    `read_only` also skips the outputs nothing reads (`read_outputs`)."""
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
