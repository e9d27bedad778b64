"""Throughput of one recurrent layer, our backends and their peers side by side.

Every class is parametrized over cell x backend x shape x dtype, where "backend" holds our
backends *and* the peers (torch.nn on the CPU, torch.nn on cuDNN), so ``asv compare`` and the
published pages put them next to each other. The cases, inputs, runners, answer checks and the
CUDA-event timing are rnn_gpu's benchmark harness (``rnn_gpu.bench``), the same code
``rnn-gpu bench`` runs: this module only maps it onto asv's conventions.

* ``time_forward`` / ``time_forward_backward``: asv's own timing loop. On a GPU its clock is
  read off CUDA events (``timer``), so a sample is GPU time, synchronised at both ends.
* ``track_tokens_per_s`` (T*B per second) and ``track_tflops`` (GEMM flops, see
  ``rnn_gpu.bench.flops``): the median of the harness's timed calls.
* ``track_peak_memory`` (GPU): bytes the call needs beyond its inputs, from torch's allocator.

``setup`` raises ``NotImplementedError`` for a combination that cannot run here (a GPU backend
on a CPU-only machine, a dtype a backend declines), which asv shows as skipped. It builds the
inputs, checks our backend's answer (and gradients, for forward+backward) against the peer's,
and warms up, so compilation and autotuning are never timed. A wrong answer fails the
benchmark: no speed is recorded for it.
"""

from __future__ import annotations

import contextlib
import functools

from rnn_gpu.bench import cases, flops, memory, peers, runner, threads, timing

# Imported up front so that under `--launch-method forkserver` (CI's quick pass) the 3 s import
# happens once in the server instead of in each of the 144 CPU benchmark processes; under
# spawn, the configured default, it changes nothing. Without torch the peers skip themselves.
with contextlib.suppress(ImportError):
    import torch  # noqa: F401

CPU_BACKENDS = ("numpy", peers.PEER_TORCH_CPU)
GPU_BACKENDS = ("triton", "cupy", peers.PEER_TORCH_CUDNN)
TIMED_CALLS = 5          # per track_ value: the median of 5 keeps one outlier from moving it


@functools.cache
def _cuda_clock():
    return timing.CudaEventClock("cuda")


def gpu_clock() -> float:
    """asv ``timer`` for GPU benchmarks: seconds on CUDA events (created on first use)."""
    return _cuda_clock()()


def _name(shape) -> str:
    """(T, B, H) -> "TxBxH", the parameter value asv shows."""
    return "x".join(map(str, shape))


def _runner_for(name: str, device: str) -> peers.Runner:
    if name in (peers.PEER_TORCH_CPU, peers.PEER_TORCH_CUDNN):
        peer = peers.TorchRunner(device)
        if peer.name != name:
            raise NotImplementedError(f"{name} does not run on {device}")
        return peer
    return peers.BackendRunner(name, explicit=True)


class _Recurrent:
    """One layer, one direction, input size = hidden size. Subclasses fix device and pass."""

    param_names = ["cell", "backend", "shape", "dtype"]
    device = "cpu"
    pass_ = "forward"
    timeout = 900            # the GPU set's largest train cases include a slow peer
    warmup_time = 0.5

    def setup(self, cell, backend, shape, dtype):
        T, B, I, H = cases.parse_shape(shape)
        self.case = cases.Case(cell, T, B, I, H, dtype, self.device, self.pass_)
        this = _runner_for(backend, self.device)
        reason = this.unavailable_reason(self.case)
        if reason:
            raise NotImplementedError(reason)
        params, x = runner.make_inputs(self.case)
        prepared = this.prepare(self.case, params, x)
        result = prepared.result()                     # the first call: compiles, autotunes
        if not this.is_peer:       # half precision: against the peer in float32 (DESIGN §6)
            peer = peers.TorchRunner(self.device)
            reference = runner.reference_result(self.case, peer)
            if reference is not None:
                runner.check_against_peer(self.case, result, reference, runner=this.name,
                                          peer=peer.name)
        del result
        self.call = prepared.call
        self.call()                                    # steady state before asv's loop

    def _median_seconds(self) -> float:
        timer = timing.timer_for(self.case.device)
        # One runner, already warm (setup): no interleaving or extra warm call needed.
        return timing.measure({"call": self.call}, timer=timer, repeats=TIMED_CALLS,
                              warm_each=False)["call"].median

    def track_tokens_per_s(self, *params):
        return self.case.tokens / self._median_seconds()

    track_tokens_per_s.unit = "tokens/s"

    def track_tflops(self, *params):
        return flops.case_flops(self.case) / self._median_seconds() / 1e12

    track_tflops.unit = "TFLOP/s"


class _Gpu(_Recurrent):
    device = "cuda"
    params = [list(cases.CELLS), list(GPU_BACKENDS),
              [_name(s) for s in (*cases.GPU_SHAPES, cases.LONG_SHAPE)],
              list(cases.GPU_DTYPES)]
    timer = staticmethod(gpu_clock)

    def track_peak_memory(self, *params):
        return memory.peak_bytes(self.call, self.case.device)

    track_peak_memory.unit = "bytes"


class _Cpu(_Recurrent):
    params = [list(cases.CELLS), list(CPU_BACKENDS),
              [_name(s) for s in cases.ASV_CPU_SHAPES], list(cases.CPU_DTYPES)]

    def setup(self, *params):
        # Every runner on all usable cores, as `rnn-gpu bench` runs them: left to their own
        # defaults, torch and OpenBLAS (and our tiles) could each pick another count. Held
        # from setup to teardown, since asv times between them.
        self._threads = threads.same_threads(threads.available_cores())
        self._threads.__enter__()
        try:
            super().setup(*params)
        except BaseException:
            self.teardown(*params)
            raise

    def teardown(self, *params):
        held, self._threads = getattr(self, "_threads", None), None
        if held is not None:
            held.__exit__(None, None, None)


class CpuForward(_Cpu):
    """Inference on the CPU: our NumPy backend against torch.nn, same thread count."""

    def time_forward(self, *params):
        self.call()


class CpuForwardBackward(_Cpu):
    """A training step on the CPU: forward, then backward of a fixed loss on every output."""

    pass_ = "train"

    def time_forward_backward(self, *params):
        self.call()


class GpuForward(_Gpu):
    """Inference on one GPU: Triton and CuPy against torch.nn on cuDNN (DESIGN §5 shapes)."""

    def time_forward(self, *params):
        self.call()


class GpuForwardBackward(_Gpu):
    """A training step on one GPU: forward, then backward of a fixed loss on every output."""

    pass_ = "train"

    def time_forward_backward(self, *params):
        self.call()
