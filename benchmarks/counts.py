"""``python -m benchmarks --count``: what each case costs a GPU, counted on any machine
(docs/design.md sections 6 and 7): the kernels one call launches, the bytes each of them reads
and writes, the convolution and matmul FLOPs, and the floor they put under the call's time on
an H100 and an H200. Nothing is timed.

Each (case, provider) is built as the timing run builds it, but on ``meta`` tensors (shapes,
no data) at the benchmark shapes, inside ``fastgan.ops.launch.recording()``: fastgan's Triton
launches are recorded instead of run, and meta tensors take the Triton path that CUDA tensors
take. It is called once to warm up (cached parameters, the optimizer's state), then once
counted. Providers (``COUNT_PROVIDERS``):

* ``eager``: the eager rows' plain PyTorch (``TrainSteps``' R1 reduces with
  ``fastgan.grad_sq_norm`` for every backend, so there it launches the Triton kernels, as on
  CUDA);
* ``fastgan-triton`` and ``fastgan-cudnn``: the fastgan rows with every ``conv2d_act`` forward
  forced (``FASTGAN_CONV``) to the Triton kernel, or to ``F.conv2d`` then ``bias_act``; on a
  GPU the per-shape choice takes one of the two (or eager's) for each layer.

What is counted, per kernel:

* **Kernels.** Every Triton launch, and every aten op below autograd (a
  ``TorchDispatchMode``) except those that launch nothing (``launches_nothing``): views (the
  schema says the output aliases an input: ``view``, the ``reshape`` of a contiguous tensor,
  ``transpose``, ``t``, ``expand``, ``slice``, ``detach``, ``alias``) and ``_unsafe_view``;
  allocations (``empty*``, ``new_empty*``); ops that read only metadata
  (``is_same_size``); ops whose tensors are all on the host (Adam's step counters); the
  ``profiler`` namespace. ``convolution_backward`` is one kernel per gradient it returns
  (input, weight, bias), as cuDNN runs one for each. What an op launches inside its own CUDA
  code counts as one kernel: cuDNN's algorithm kernels, a weight relaid to channels_last, the
  launches of one ``_foreach_*`` op (CUDA splits one past 64-110 tensors or 320 chunks of
  64 Ki elements).
* **Bytes**, as if nothing stayed in cache: each tensor a kernel reads, once, and each it
  writes, once. A tensor's bytes are its distinct elements (an expanded one counts its
  storage once) times its element size, and a tensor passed twice counts once. An aten op
  reads its tensor arguments and writes its outputs and the arguments it mutates (as its
  schema says); it does not read ``out=`` arguments, the first argument of ``NOT_READ`` ops
  or the template of ``*_like`` and ``new_*`` factories. A Triton launch writes the pointer
  arguments its kernel stores through and reads all others (``pointer_roles``).
* **FLOPs**: 2 x multiply-adds of convolutions and matmuls, by ``FlopCounterMode``'s formulas
  (``torch.utils.flop_counter.flop_registry``; the mode itself is not used: its module
  tracker fails under ``autograd.grad`` through an ``nn.Module``), except that each gradient
  of ``convolution_backward`` costs what the convolution it differentiates costs (torch's
  formula counts a grouped weight gradient ``groups`` times over); Triton launches that do
  such work by ``TRITON_FLOPS`` (``conv2d_act_fwd``: the convolution formula on its x, w, y).

Floors (``floor_ms``): on each GPU of ``GPUS``, ``max(bytes / bandwidth, FLOPs / peak)``,
with the dense tensor-core peak of the case's dtype (bf16; TF32 for float32, torch's default
for convolutions). The bound on a speed-up is eager's floor over fastgan's. Beside them,
``launches * LAUNCH_US``: the host time to enqueue the kernels at the cheapest launch cost
measured (docs/design.md section 8), which a CUDA graph removes.
"""
from __future__ import annotations

import datetime
import functools
import inspect
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_flop_count, flop_registry

from benchmarks import cases as cases_mod
from benchmarks import report
from benchmarks.common import BuildContext, classify_failure, conv_path_forced
from fastgan.ops import launch

# provider -> the FASTGAN_CONV it forces (None: as the timed rows run)
COUNT_PROVIDERS = {"eager": None, "fastgan-triton": "triton", "fastgan-cudnn": "cudnn"}
# The host-overhead bench times Python, not kernels; +graph modes launch what their ungraphed
# mode launches (a graph replays them without the host's launch cost).
COUNT_BENCHES = tuple(b for b in cases_mod.BENCHES if b != "overhead")
LAUNCH_US = 3.0
HEADER_KEYS = ("device", "torch", "triton", "fastgan", "date", "launch_us", "gpus")
DEVICE = "meta tensors (counted, not timed)"


@dataclass(frozen=True)
class Gpu:
    """A GPU's data-sheet figures: HBM bandwidth (bytes/s) and dense tensor-core peak
    (FLOP/s) per dtype; ``pattern`` matches the names ``torch.cuda.get_device_name()`` gives
    it."""
    name: str
    pattern: str
    bandwidth: float
    peak: dict
    source: str

    def floor_ms(self, nbytes: float, flops: float, dtype: str) -> float:
        return 1e3 * max(nbytes / self.bandwidth, flops / self.peak[dtype])


# The data sheets give tensor-core rates with 2:4 sparsity: the dense ones are half.
_HOPPER_PEAK = {"bfloat16": 1979e12 / 2, "float32": 989e12 / 2}  # bf16, TF32
GPUS = (
    Gpu("H100 SXM", r"H100.*(SXM|HBM3)", 3.35e12, _HOPPER_PEAK,
        "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"),
    Gpu("H200", r"H200", 4.8e12, _HOPPER_PEAK, "https://www.nvidia.com/en-us/data-center/h200/"),
)


def gpu_for(device_name: str) -> Gpu | None:
    """The ``GPUS`` entry of a device name (``NVIDIA H100 80GB HBM3``), or None."""
    return next((g for g in GPUS if re.search(g.pattern, device_name)), None)


# ---------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class Kernel:
    """One kernel launch: ``aten.<op>`` (``aten.convolution_backward[weight]`` per gradient)
    or a Triton launcher's name, the bytes it reads and writes, its FLOPs."""
    name: str
    read: int
    written: int
    flops: int


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements of ``t`` times its element size (a stride-0 dim counts once)."""
    if t.numel() == 0:
        return 0
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)


def _bytes(tensors) -> int:
    """Bytes of ``tensors``, each view of a storage counted once."""
    seen = {(t.untyped_storage()._cdata, t.storage_offset(), t.shape, t.stride(), t.dtype):
            tensor_bytes(t) for t in tensors}
    return sum(seen.values())


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


NO_KERNEL_OPS = frozenset({"_unsafe_view", "empty", "empty_like", "empty_strided",
                           "new_empty", "new_empty_strided", "is_same_size"})
NOT_READ = frozenset({"copy_", "fill_", "zero_", "normal_", "uniform_"})  # overwrite arg 0
CONV_GRADS = {"input": ("grad_output", "weight"), "weight": ("grad_output", "input"),
              "bias": ("grad_output",)}  # gradient -> what its kernel reads


def launches_nothing(func, tensors: list[torch.Tensor]) -> bool:
    """Whether the aten op ``func`` (on ``tensors``, inputs and outputs) launches no kernel
    (the module docstring's rule)."""
    return (func.namespace == "profiler" or func.is_view
            or func.overloadpacket.__name__ in NO_KERNEL_OPS
            or all(t.device.type == "cpu" for t in tensors))


def _flops(func, values: list, out) -> int:
    """FLOPs of ``func`` on ``values`` (its arguments in schema order) by its
    ``flop_registry`` formula, 0 for ops without one."""
    formula = flop_registry.get(func.overloadpacket)
    return formula(*values, out_val=out) if formula else 0


def aten_kernels(func, args: tuple, kwargs: dict, out) -> list[Kernel]:
    """The kernels of one aten op call (none, one, or one per convolution gradient)."""
    name = func.overloadpacket.__name__
    bound = [(a, v) for a, v in zip(func._schema.arguments, args)]
    bound += [(a, kwargs[a.name]) for a in func._schema.arguments if a.name in kwargs]
    if launches_nothing(func, _tensors([v for _, v in bound]) + _tensors(out)):
        return []
    if name == "convolution_backward":
        named = {a.name: v for a, v in bound}
        conv = conv_flop_count(list(named["input"].shape), list(named["weight"].shape),
                               list(named["grad_output"].shape), named["transposed"])
        return [Kernel(f"aten.{name}[{grad}]", _bytes(_tensors([named[r] for r in reads])),
                       _bytes(_tensors(result)), 0 if grad == "bias" else conv)
                for (grad, reads), wanted, result in zip(CONV_GRADS.items(),
                                                         named["output_mask"], out) if wanted]
    reads, writes = [], _tensors(out)
    for i, (arg, value) in enumerate(bound):
        mutated = arg.alias_info is not None and arg.alias_info.is_write
        if mutated:
            writes += _tensors(value)
        template = i == 0 and (name.endswith("_like") or name.startswith("new_"))
        overwritten = mutated and (arg.kwarg_only or (i == 0 and name in NOT_READ))
        if not (template or overwritten):
            reads += _tensors(value)
    return [Kernel(f"aten.{name}", _bytes(reads), _bytes(writes),
                   _flops(func, [v for _, v in bound], out))]


@functools.cache
def pointer_roles(kernel) -> tuple[tuple[str, ...], frozenset[str]]:
    """``(argument names, names of the pointers it writes)`` of a Triton kernel (a
    ``JITFunction``, or what wraps one: an autotuner, the interpreter's function): it writes
    those its Python source stores through (``tl.store(<name>``) and never loads from by name
    (``tl.load(<name>``)."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    source = inspect.getsource(fn)
    stored = set(re.findall(r"tl\.store\(\s*(\w+)", source))
    loaded = set(re.findall(r"tl\.load\(\s*(\w+)", source))
    return tuple(inspect.signature(fn).parameters), frozenset(stored - loaded)


def _conv_launch_flops(pointers: dict) -> int:
    return conv_flop_count(list(pointers["x_ptr"].shape), list(pointers["w_ptr"].shape),
                           list(pointers["y_ptr"].shape))


TRITON_FLOPS = {"conv2d_act_fwd": _conv_launch_flops}  # launcher name -> FLOPs(pointers)


def triton_kernel(record: launch.Launch) -> Kernel:
    """The ``Kernel`` of one recorded Triton launch."""
    names, written = pointer_roles(record.kernel)
    pointers = dict(zip(names, record.pointers))
    reads = [t for n, t in pointers.items() if n not in written]
    writes = [t for n, t in pointers.items() if n in written]
    flops = TRITON_FLOPS[record.name](pointers) if record.name in TRITON_FLOPS else 0
    return Kernel(record.name, _bytes(reads), _bytes(writes), flops)


class KernelCounter(TorchDispatchMode):
    """``with KernelCounter() as counter: ...``: the kernels the block launches, in order
    (``counter.kernels``). fastgan's Triton launches are recorded (``launch.recording()``),
    not run; ``counter.triton`` counts them."""

    def __init__(self):
        super().__init__()
        self.kernels: list[Kernel] = []
        self.triton = 0
        self._recording = launch.recording()
        self._launches: list = []
        self._taken = 0

    def __enter__(self):
        self._launches = self._recording.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._take_launches()
        self._recording.__exit__(*exc)

    def _take_launches(self) -> None:
        """Append the Triton launches recorded since the last aten op (keeps call order)."""
        self.kernels += [triton_kernel(record) for record in self._launches[self._taken:]]
        self.triton += len(self._launches) - self._taken
        self._taken = len(self._launches)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._take_launches()
        out = func(*args, **kwargs)
        self.kernels += aten_kernels(func, args, kwargs, out)
        return out


def count_ctx() -> BuildContext:
    """How cases build for counting: meta tensors, one input set, fastgan's op rows on the
    Triton kernels (as on CUDA)."""
    return BuildContext(torch.device("meta"), rotate_bytes=0, max_sets=1,
                        compile_backend="inductor", fastgan_backend="triton")


def count_call(build, conv_path: str | None) -> KernelCounter:
    """Build (``build()``) and warm up a callable with ``FASTGAN_CONV=conv_path``, launches
    recorded, then count one call of it."""
    with launch.recording(), conv_path_forced(conv_path):
        fn = build()
        fn()
        with KernelCounter() as counter:
            fn()
    return counter


def summarize(counter: KernelCounter, per: int = 1) -> dict:
    """Totals of a count, divided by ``per`` (units of work in the counted call): launches
    (of which Triton), bytes read and written, FLOPs, and per kernel name its launches and
    bytes, largest bytes first."""
    def unit(value):
        return value if per == 1 else value / per

    by_name: dict[str, list[int]] = {}
    for k in counter.kernels:
        entry = by_name.setdefault(k.name, [0, 0])
        entry[0] += 1
        entry[1] += k.read + k.written
    kernels = {name: {"launches": unit(n), "bytes": unit(b)}
               for name, (n, b) in sorted(by_name.items(), key=lambda kv: -kv[1][1])}
    return {"launches": unit(len(counter.kernels)), "triton_launches": unit(counter.triton),
            "bytes_read": unit(sum(k.read for k in counter.kernels)),
            "bytes_written": unit(sum(k.written for k in counter.kernels)),
            "flops": unit(sum(k.flops for k in counter.kernels)), "kernels": kernels}


def floors(row: dict) -> dict[str, float]:
    """The floor of ``row`` on every GPU of ``GPUS``, in ms."""
    nbytes = row["bytes_read"] + row["bytes_written"]
    return {g.name: round(g.floor_ms(nbytes, row["flops"], row["dtype"]), 6) for g in GPUS}


def count_row(case: cases_mod.Case, provider: str, ctx: BuildContext) -> dict:
    """The counts row of one (case, provider); a failure becomes a row with its reason."""
    row = {"bench": case.bench, "mode": case.mode, "shape": case.shape,
           "dtype": case.dtype_name, "provider": provider,
           "per": "iteration" if case.calls_per_unit > 1 else "call"}
    timed_provider = "eager" if provider == "eager" else "fastgan"
    try:
        counter = count_call(lambda: case.build(ctx, timed_provider), COUNT_PROVIDERS[provider])
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row, the run goes on
        status, note = classify_failure(provider, exc)
        return {**row, "status": status, "note": note}
    row.update(summarize(counter, case.calls_per_unit))
    return {**row, "floor_ms": floors(row), "status": "ok", "note": ""}


def count_cases(size: str = "full", benches=COUNT_BENCHES) -> list[cases_mod.Case]:
    """The cases ``--count`` counts: those of ``benches`` (of ``COUNT_BENCHES``) at ``size``,
    without the +graph modes."""
    return [c for c in cases_mod.all_cases(size, [b for b in benches if b in COUNT_BENCHES])
            if not c.mode.endswith("+graph")]


def header(fastgan_sha: str, triton: str | None) -> dict:
    """The header of ``counts.json`` (docs/design.md section 7)."""
    return {"device": DEVICE, "torch": torch.__version__, "triton": triton,
            "fastgan": fastgan_sha, "date": datetime.date.today().isoformat(),
            "launch_us": LAUNCH_US,
            "gpus": [{"name": g.name, "bandwidth_tbps": g.bandwidth / 1e12,
                      "bf16_tflops": g.peak["bfloat16"] / 1e12,
                      "tf32_tflops": g.peak["float32"] / 1e12, "source": g.source}
                     for g in GPUS]}


def _print_row(row: dict, seconds: float) -> None:
    if row["status"] != "ok":
        print(f"{row['bench']:12} {row['mode']:8} {row['dtype']:8} {row['provider']:14} "
              f"{row['shape'][:40]:40} {row['status']}: {row['note']}", flush=True)
        return
    floor = row["floor_ms"][GPUS[0].name]
    print(f"{row['bench']:12} {row['mode']:8} {row['dtype']:8} {row['provider']:14} "
          f"{row['shape'][:40]:40} {row['launches']:9.1f} kernels "
          f"{report.si(row['bytes_read'] + row['bytes_written'])}B {report.si(row['flops'])}FLOP"
          f"  {GPUS[0].name} floor {floor:.4g} ms  [{seconds:4.1f} s]", flush=True)


def run(selected: list[cases_mod.Case], out_dir: Path, head: dict) -> Path:
    """Count every case of ``selected`` for every provider into ``out_dir/counts.json``
    (merged with the rows already there, rewritten after each row); returns its path."""
    json_path = out_dir / report.COUNTS_FILE
    old = report.load(json_path)
    ctx = count_ctx()
    rows: list[dict] = []
    start = time.monotonic()
    for case in selected:
        for provider in COUNT_PROVIDERS:
            began = time.monotonic()
            rows.append(count_row(case, provider, ctx))
            _print_row(rows[-1], time.monotonic() - began)
            report.write_json(json_path, report.merge(old, head, rows, HEADER_KEYS))
    if not rows and old is None:
        report.write_json(json_path, report.merge(None, head, [], HEADER_KEYS))
    statuses = Counter(r["status"] for r in rows)
    print(f"{len(rows)} rows in {time.monotonic() - start:.1f} s: {dict(statuses)}", flush=True)
    return json_path
