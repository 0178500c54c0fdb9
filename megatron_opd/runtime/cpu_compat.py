"""megatron-core on a machine without CUDA: the one place that adapts it to CPU + gloo.

megatron-core is written for GPUs and reaches for CUDA in a handful of places even when every
tensor lives on the CPU. `enable()` patches exactly those places, each patch named after the
failure it prevents (observed with megatron-core 0.16.1, torch 2.13 CPU, gloo). It refuses to run
when CUDA is available, so a GPU job can never be silently degraded by it.

Patches (the numbers match docs/architecture.md, "CPU compatibility"):
  1. device queries   torch.cuda.current_device() -> "cpu"   (GlobalMemoryBuffer, TP layers
                      allocate buffers on the "current device").
  2. RNG              torch.cuda.{manual_seed,get_rng_state,set_rng_state} and megatron's
                      _get/_set_cuda_rng_state drive the CPU default generator, so the
                      model-parallel RNG tracker forks CPU states ("cuda rng state
                      model-parallel-rng is not added" otherwise). The tracker's "CPU RNG state
                      changed within GPU RNG context" warning is expected then and filtered.
  3. device="cuda"    a TorchFunctionMode rewrites cuda devices in factory calls and
                      Tensor.to/Tensor.cuda to cpu (pipeline schedules, optimizer, clip_grads
                      allocate with device="cuda" explicitly).
  4. streams/events   torch.cuda.{Stream,Event,stream,current_stream,synchronize} become no-ops
                      (MoE token dispatcher, checkpoint writer's synchronize).
  5. te_general_gemm  defined as None in moe_utils when Transformer Engine is absent (NameError
                      in the MoE router otherwise). Not a CPU matter: a GPU without TE hits it
                      too (seen on an H100), so `without_transformer_engine()` applies it alone
                      there.
  6. numpy splits     moe_utils.maybe_move_tensor_to_cpu honours as_numpy for CPU tensors (gloo's
                      all_to_all_single rejects tensor split sizes).
  7. type names       Tensor.type() with no argument answers the CUDA type name for CPU tensors
                      (optimizer and clip_grads assert 'torch.cuda.FloatTensor').
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Patch 3: every `device=` that names CUDA (a string, a torch.device or an ordinal) becomes cpu."""

    _CPU = torch.device("cpu")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=self._CPU)
        elif func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], self._CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Patch 4: stands in for torch.cuda.Stream / Event; everything is synchronous on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        # record_event() must return something with synchronize(); any call yields another null.
        return lambda *a, **k: _NullStream()


class _RngStateWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def without_transformer_engine() -> None:
    """Patch 5, on any device: megatron-core 0.16.1's MoE router names `te_general_gemm`, which
    its module only defines when Transformer Engine imports."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def enable() -> None:
    """Apply every patch once per process. A no-op when already enabled; an error with CUDA present."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_opd.runtime.cpu_compat.enable() was called on a machine with CUDA; "
            "the CPU compatibility layer must never run on a GPU job"
        )

    cuda = torch.cuda
    # 1. device queries
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda device: None
    # 2. RNG: the CPU default generator plays the CUDA generator.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    logging.getLogger(mcore_random.__name__).addFilter(_RngStateWarningFilter())
    # 4. streams and events
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.stream = lambda stream=None: _NullStream()
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.synchronize = lambda device=None: None
    # 3. explicit cuda devices
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    # 5 and 6: MoE without Transformer Engine.
    from megatron.core.transformer.moe import moe_utils

    without_transformer_engine()
    original_move = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original_move)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    for module_name in ("megatron.core.transformer.moe.token_dispatcher",):
        module = __import__(module_name, fromlist=["_"])
        if hasattr(module, "maybe_move_tensor_to_cpu"):
            module.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    # 7. CUDA type names for CPU tensors, only in the no-argument query form.
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            # The torch-function mode may route this call back here once: prefix only once.
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type
    _ENABLED = True
