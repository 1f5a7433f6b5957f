"""How torch_ref runs PyTorch (compile mode, SGD kernel, layout), resolved per device and recorded.

The benchmark races time to accuracy, so the PyTorch side is set up the way an
expert would race it (airbench94_compiled: `torch.compile(mode="max-autotune")`,
fused SGD, channels-last, bf16 autocast, cuDNN benchmark) and every summary says
which setup ran. On the CPU the defaults are eager with foreach SGD (bit-identical
to the for-loop SGD there), so the tests and the parity suite stay fast and exact.

The learning rate changes every step. It stays a host float in the optimizer's
`param_groups`: the optimizer runs eagerly, outside the compiled (and CUDA-graphed)
forward/backward, and passes the float to its kernels as an argument, so nothing
syncs and nothing recompiles. (A device-tensor LR only pays off when the optimizer
step itself is compiled or graphed, which is not done here.)
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

COMPILE_MODES: tuple[str, ...] = (
    "none",
    "default",
    "max-autotune",
    "max-autotune-no-cudagraphs",
    "reduce-overhead",
)
CUDA_GRAPH_MODES: tuple[str, ...] = ("max-autotune", "reduce-overhead")  # inductor's cudagraphs
SGD_IMPLS: tuple[str, ...] = ("fused", "foreach", "for-loop")
LR_HANDLING = "host float in param_groups (eager optimizer: no sync, no recompile)"


@dataclasses.dataclass(frozen=True)
class TorchSetup:
    """The PyTorch knobs of a run; `None` fields take the device's default in `resolve`.

    compile_mode: "none" (eager) or a `torch.compile` mode; the default is
      "max-autotune" on CUDA (as airbench94_compiled), "none" on the CPU.
    compile_backend: `torch.compile`'s backend ("inductor"; "eager"/"aot_eager" for
      cheap guard/recompile tests; those take mode "default" only).
    compile_augment: compile the augmentation gather/cutout into the same graph as
      normalisation + forward + loss (True), or run it eagerly before it (False).
    sgd_impl: torch.optim.SGD's kernel: "fused", "foreach" or "for-loop".
    channels_last: the net and its input in channels-last memory.
    cudnn_benchmark: `torch.backends.cudnn.benchmark` (CUDA only).
    static_addresses: keep the nets, resident data and constants at fixed addresses
      across the runs of a process (reused in place), so CUDA graphs replay instead
      of re-recording on each new run; the default is on exactly when CUDA graphs are.
    """

    compile_mode: str | None = None
    compile_backend: str = "inductor"
    compile_augment: bool | None = None
    sgd_impl: str | None = None
    channels_last: bool = True
    cudnn_benchmark: bool | None = None
    static_addresses: bool | None = None

    def __post_init__(self) -> None:
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )
        if self.sgd_impl is not None and self.sgd_impl not in SGD_IMPLS:
            raise ValueError(
                f"SGD implementation must be one of {', '.join(SGD_IMPLS)}, got {self.sgd_impl!r}"
            )
        if not self.compile_backend:
            raise ValueError("compile backend must be a non-empty name, e.g. inductor")

    @property
    def compiled(self) -> bool:
        return self.compile_mode not in (None, "none")

    def cuda_graphs(self, device: torch.device) -> bool:
        """Whether inductor captures the compiled functions in CUDA graphs on `device`."""
        return (
            device.type == "cuda"
            and self.compile_backend == "inductor"
            and self.compile_mode in CUDA_GRAPH_MODES
        )

    def resolve(self, device: torch.device, compile: bool | None = None) -> TorchSetup:
        """Every field concrete for `device`; `compile` is the older on/off switch.

        compile=False means mode "none"; compile=True means the device's compiled
        default ("max-autotune" on CUDA, "default" on the CPU). Contradictions raise
        ValueError.
        """
        mode = self.compile_mode
        if compile is False and mode not in (None, "none"):
            raise ValueError(f"compile=False contradicts compile mode {mode!r}")
        if compile is True and mode == "none":
            raise ValueError("compile=True contradicts compile mode 'none'")
        if mode is None:
            if compile is None:
                compile = device.type == "cuda"
            mode = ("max-autotune" if device.type == "cuda" else "default") if compile else "none"
        compiled = mode != "none"
        if compiled and self.compile_backend != "inductor" and mode != "default":
            raise ValueError(
                f"compile mode {mode!r} is inductor's; backend {self.compile_backend!r} "
                "takes compile mode 'default'"
            )
        if compiled:
            _check_backend(self.compile_backend)
        augment = self.compile_augment
        if augment and not compiled:
            raise ValueError("compile_augment needs a compile mode other than 'none'")
        if augment is None:
            augment = compiled and device.type == "cuda"
        sgd = self.sgd_impl or ("fused" if device.type == "cuda" else "foreach")
        cudnn = self.cudnn_benchmark
        if cudnn is None:
            cudnn = device.type == "cuda"
        out = dataclasses.replace(
            self,
            compile_mode=mode,
            compile_augment=bool(augment),
            sgd_impl=sgd,
            cudnn_benchmark=bool(cudnn) and device.type == "cuda",
        )
        static = self.static_addresses
        if static is None:
            static = out.cuda_graphs(device)
        return dataclasses.replace(out, static_addresses=bool(static))

    def compile_kwargs(self) -> dict[str, Any]:
        """`torch.compile`'s keyword arguments (static shapes: no dynamic batch dimension)."""
        kw: dict[str, Any] = {"dynamic": False, "backend": self.compile_backend}
        if self.compile_backend == "inductor" and self.compile_mode not in (None, "none"):
            kw["mode"] = self.compile_mode
        return kw

    def sgd_kwargs(self) -> dict[str, Any]:
        """torch.optim.SGD's `fused=`/`foreach=` for `sgd_impl` (None: torch's own choice)."""
        return {
            "fused": {"fused": True, "foreach": False},
            "foreach": {"fused": False, "foreach": True},
            "for-loop": {"fused": False, "foreach": False},
        }.get(self.sgd_impl or "", {})


def _check_backend(name: str) -> None:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise ValueError(f"unknown compile backend {name!r}; torch has {', '.join(known)}")


def record(s: TorchSetup, device: torch.device, bf16: bool) -> dict[str, Any]:
    """A resolved setup as the summary's `torch_setup`: its fields plus what else shapes speed."""
    out: dict[str, Any] = dataclasses.asdict(s)
    cuda = device.type == "cuda"
    out.update(
        torch_version=torch.__version__,
        python_version=sys.version.split()[0],
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
        cuda_graphs=s.cuda_graphs(device),
        cudnn_benchmark_active=bool(torch.backends.cudnn.benchmark) if cuda else False,
        cudnn_version=torch.backends.cudnn.version() if cuda else None,
        autocast_dtype="bfloat16" if bf16 else None,
        tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
        tf32_cudnn=bool(torch.backends.cudnn.allow_tf32) if cuda else None,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        lr=LR_HANDLING,
        cpu_threads=torch.get_num_threads(),
    )
    return out


def dynamo_graphs() -> int:
    """Graphs torch._dynamo has compiled in this process so far (0 if dynamo never loaded).

    `counters["stats"]["unique_graphs"]` grows by one per graph handed to the
    backend, recompiles after a failed guard included (torch 2.0 through 2.13).
    """
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is None:
        return 0
    return int(dynamo.counters["stats"]["unique_graphs"])
