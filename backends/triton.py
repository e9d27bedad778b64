"""Triton backend: the fused recurrence of every cell as persistent Triton kernels.

The kernels (``rnn_gpu.kernels.triton``) run the whole sequence in one launch, forward and
backward, for RNN (tanh, relu), LSTM, GRU and TwoStageRNN in float32 (IEEE unless TF32 is
allowed), float16 and bfloat16, with fp32 accumulation and fp32 state. It takes torch CUDA
tensors; CuPy arrays reach it through DLPack without a copy (the layer code converts), and
results go back in the caller's kind.

With ``TRITON_INTERPRET=1`` in the environment (before triton is imported) the same kernels
run on the CPU through Triton's interpreter, on CPU torch tensors: that is how CI tests them
and how a kernel can be debugged without a GPU. Auto selection then ranks this backend below
numpy (the interpreter is slow); choose it by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np

from rnn_gpu import _config, _segments
from rnn_gpu.backend_api import Backend, Problem, SegmentCosts, Tape
from rnn_gpu.cells import SPECS
from rnn_gpu.kernels.triton import MAX_STEP_ELEMENTS, interpreting, step_elements, steps_of

DTYPES = ("float32", "float16", "bfloat16")
INT32_MAX = 2**31 - 1
PRIORITY = 100                    # above cupy (the next GPU backend) and numpy
INTERPRETED_PRIORITY = -10        # below numpy: the interpreter is for tests and debugging

# Variable lengths as segments over the live rows (rnn_gpu._segments): each segment is tiled
# afresh for its live rows, which the persistent kernels cannot do inside one launch. A bench
# variant ("triton:segments") until a card measures it against the default, every row for every
# step with the ended ones masked (.ci/gpu bench-lengths); none has yet. A segment's rows are
# rounded up to an eighth of the batch (at least 64), so that the tuner, which keys on the
# exact batch, meets at most 8 sizes per batch instead of one per live count.
SEGMENTS = False
SEGMENT_CALL_STEPS = 2            # a call (launches, the weights' first read) ~2 steps: a guess
SEGMENT_MIN_ROWS = 64


class TritonBackend(Backend):
    name = "triton"
    array_kind = "torch"

    @property
    def priority(self) -> int:                       # type: ignore[override]
        return INTERPRETED_PRIORITY if interpreting() else PRIORITY

    def unavailable_reason(self) -> str | None:
        for module in ("torch", "triton"):
            if importlib.util.find_spec(module) is None:   # [triton] brings both
                return f"{module} is not installed (pip install 'rnn-gpu[triton]')"
        if interpreting():
            return None
        import torch

        if not torch.cuda.is_available():
            return ("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU "
                    "through Triton's interpreter)")
        return None

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        interpreted = interpreting()
        if interpreted and problem.device != "cpu":
            reasons.append(f"TRITON_INTERPRET=1 runs the kernels on the CPU, but the input is "
                           f"on {problem.device}; unset it to run them on the GPU")
        elif not interpreted and problem.device == "cpu":
            reasons.append("the triton backend runs on CUDA, but the input is on the CPU (move "
                           "it with .to('cuda'), or set TRITON_INTERPRET=1 to run the kernels "
                           "through Triton's interpreter)")
        if problem.dtype not in DTYPES:
            reasons.append(f"the triton backend computes in {', '.join(DTYPES)}, not "
                           f"{problem.dtype} (use the numpy backend for float64)")
        elif problem.dtype == "bfloat16" and problem.device.startswith("cuda") and (
                not interpreted):
            major, minor = _capability(problem.device)
            if major < 8:
                reasons.append(f"bfloat16 needs compute capability 8.0, {problem.device} has "
                               f"{major}.{minor} (use float16 or float32)")
        if problem.cell not in ("rnn", "lstm", "gru", "twostage"):
            reasons.append(f"the triton backend has no cell {problem.cell!r}")
        else:
            # TwoStageRNN's kernels index W (H x H, three of them) and a step (B x 2H at most)
            # with int32 as the gated ones do (common.row_block_dot)
            B, H = problem.batch, problem.hidden_size
            n = step_elements(B, H) if problem.cell != "twostage" else max(2 * H * B, H * H)
            if n > MAX_STEP_ELEMENTS:
                # past the limit through the batch (a step's rows) or the weights (H x H)
                fix = ("split the batch" if B > H else
                       "the weights alone are past it (use the numpy or cupy backend)")
                reasons.append(f"the triton kernels address one time step with 32-bit offsets; "
                               f"batch {problem.batch} x hidden size {problem.hidden_size} "
                               f"needs {n} elements per step (at most {MAX_STEP_ELEMENTS}): "
                               f"{fix}")
        if problem.has_lengths and problem.seq_len > INT32_MAX:      # _lengths: int32
            reasons.append(f"the triton kernels read the lengths as int32: {problem.seq_len} "
                           f"steps is past {INT32_MAX}; split the sequence into several calls")
        return reasons

    def segment_costs(self, problem: Problem) -> SegmentCosts | None:
        """Segments only inside the ``segments`` variant (see :data:`SEGMENTS`)."""
        if not SEGMENTS:
            return None
        quantum = _segments.few_row_counts(problem.batch, minimum=SEGMENT_MIN_ROWS)
        return SegmentCosts(0, SEGMENT_CALL_STEPS * problem.batch, quantum)

    def variants(self) -> tuple[str, ...]:
        """``segments``: variable lengths in segments over the live rows (:data:`SEGMENTS`),
        for ``rnn-gpu bench --backend triton:segments --lengths uniform``."""
        return ("segments",)

    @contextlib.contextmanager
    def variant(self, name: str) -> Iterator[None]:
        """Calls inside run the named variant; process-wide while entered."""
        global SEGMENTS
        if name not in self.variants():
            raise ValueError(f"variant: expected one of {self.variants()}, got {name!r}")
        saved, SEGMENTS = SEGMENTS, True
        try:
            yield
        finally:
            SEGMENTS = saved

    def describe_run(self, problem: Problem) -> str | None:
        """The tiling the tuner chose for this shape (see :mod:`rnn_gpu.kernels.triton.launch`)."""
        from rnn_gpu.kernels.triton import launch

        costs = self.segment_costs(problem) if problem.has_lengths else None
        if costs is not None:
            return (f"segments over the live rows (rows in multiples of {costs.row_quantum}), "
                    f"each tiled by the tuner for its rows")

        shape = (_tuned_gates(problem.cell), problem.batch, problem.hidden_size,
                 _tuned_dtype(problem.dtype), problem.device)
        if not problem.training:
            return launch.chosen(problem.cell, *shape)
        forward = launch.chosen(f"{problem.cell}-taped", *shape)
        backward = launch.chosen(f"{problem.cell}-backward", *shape)
        if forward is None or backward is None:
            return forward or backward
        return f"forward {forward}; backward {backward}"

    # ------------------------------------------------------------------ running

    def forward(self, problem: Problem, xw, weights, state, lengths, *, reverse: bool,
                keep_tape: bool):
        from rnn_gpu.kernels.triton import launch

        launch.check_mode()
        xw = xw.contiguous()
        T, B, _ = xw.shape
        H = problem.hidden_size
        w = {k: v.contiguous() for k, v in weights.items()}
        lens = _lengths(lengths, xw.device)
        precision = _precision(problem.dtype)
        with _on(xw.device):
            if problem.cell == "twostage":
                from rnn_gpu.kernels.triton.twostage import twostage_forward

                acts = _act_ids(problem.activations)
                args = (w["weight_aa"], w["weight_ha"], w["weight_hh"], w.get("bias_h"))

                def run(xw_, tiles, sync, keep):
                    return twostage_forward(acts, xw_, *args, state[0], lens, reverse=reverse,
                                            keep_tape=keep, precision=precision, tiles=tiles,
                                            grid_sync=sync)
            else:
                from rnn_gpu.kernels.triton.gated import gated_forward

                cell = _CELL_IDS[problem.cell]
                act = _act_ids(problem.activations)[0] if problem.cell == "rnn" else 0
                c0 = state[1] if problem.cell == "lstm" else None
                w_hh, h0 = w["weight_hh"], state[0]
                if problem.proj_size:         # a plain LSTM over m (kernels/triton/projected)
                    from rnn_gpu.kernels.triton import projected

                    first, stepped = projected.first_steps(T, B, lens, reverse, xw.device)
                    xw, folded = projected.fold_initial_state(xw, h0, w_hh, first, precision)
                    w_hh = projected.folded_weight(w_hh, w["weight_hr"], precision)
                    h0 = xw.new_zeros((B, H))

                def run(xw_, tiles, sync, keep):
                    y_, h_, c_, tape_ = gated_forward(
                        cell, act, xw_, w_hh, w.get("bias_hh"), h0, c0, lens,
                        reverse=reverse, keep_tape=keep, precision=precision, tiles=tiles,
                        grid_sync=sync)
                    return y_, (h_, c_), tape_

            def time_call(tiles, sync, n_steps):
                # The first n_steps of the input (repeated when the sequence is shorter: the
                # per-step cost is what is compared, and it does not depend on the values).
                steps = steps_of(xw, n_steps)
                return launch.time_cuda(lambda: run(steps, tiles, sync, keep_tape))

            # A forward that keeps the tape is tuned apart (kind "<cell>-taped"), on the call
            # it will make: per (row, unit) and step it also stores the fp32 gates, the cell
            # state and h_{t-1} (LSTM fp16: 22 more bytes beside y's 2), which shifts the
            # balance between products and stores that decides the tiling, as it did for the
            # backward (H100 runs 3 and 4: one tiling for both cost the training step ~7 ms).
            kind = f"{problem.cell}-taped" if keep_tape else problem.cell
            tiles, sync = launch.choose(kind, _tuned_gates(problem.cell), B, H,
                                        _tuned_dtype(problem.dtype), xw.device, time_call,
                                        resident=problem.cell != "twostage")
            y, final, ktape = run(xw, tiles, sync, keep_tape)
            ptape = None
            if problem.proj_size:
                m, m_final = y, final[0]
                y, h_final = projected.project_outputs(m, m_final, state[0], w["weight_hr"],
                                                       stepped, precision)
                final = (h_final, final[1])
                if keep_tape:
                    ptape = projected.ProjectionTape(
                        w["weight_hh"], w["weight_hr"], state[0], m, m_final, first, stepped,
                        folded, precision)
        dt = xw.dtype
        if problem.cell == "twostage":
            final_state = (final.to(dt),)
        elif problem.cell == "lstm":
            final_state = (final[0].to(dt), final[1].to(dt))
        else:
            final_state = (final[0].to(dt),)
        tape = None
        if keep_tape:
            tape = Tape(self.name, problem, reverse, {"kernel_tape": ktape,
                                                      "projection": ptape})
        return y, final_state, tape

    def backward(self, tape: Tape, dy, dstate):
        from rnn_gpu.kernels.triton import launch

        problem = tape.problem
        ktape = tape.data.pop("kernel_tape", None)
        if ktape is None:
            raise RuntimeError("tape: this triton tape was already used by backward()")
        dy = dy.contiguous()
        dt = dy.dtype
        B, H = dy.shape[1], problem.hidden_size          # (dy is P wide with proj_size)
        with _on(dy.device):
            if problem.cell == "twostage":
                from rnn_gpu.kernels.triton.twostage import twostage_backward, twostage_tape_steps

                def run(tape_, dy_, tiles, sync):
                    return twostage_backward(tape_, dy_, dstate[0], tiles=tiles, grid_sync=sync)

                tape_steps = twostage_tape_steps
            else:
                from rnn_gpu.kernels.triton.gated import gated_backward, gated_tape_steps

                dc = dstate[1] if problem.cell == "lstm" else None
                dh = dstate[0]
                ptape = tape.data.get("projection")
                if ptape is not None:         # into m's gradients (kernels/triton/projected)
                    from rnn_gpu.kernels.triton import projected

                    dy_h, dh_h = dy, dh
                    dy, dh = projected.gradients_in(ptape, dy_h, dh_h)

                def run(tape_, dy_, tiles, sync):
                    return gated_backward(tape_, dy_, dh, dc, tiles=tiles, grid_sync=sync)

                tape_steps = gated_tape_steps

            def time_call(tiles, sync, n_steps):
                # as the forward's: the first n_steps of the tape and of dy, repeated if short
                part, dy_part = tape_steps(ktape, n_steps), steps_of(dy, n_steps)
                return launch.time_cuda(lambda: run(part, dy_part, tiles, sync))

            # The backward picks its own tiling (the tape does not depend on the forward's):
            # H100, LSTM fp16 256x4096x256, the forward was fastest with 128-row x 64-unit
            # programs (8.99 against 9.84 ms) and the backward with 64 x 128 (~29 against
            # ~37 ms), so one choice for both cost the training step ~7 ms (run 3 and 4).
            # keyed on the precision the forward (and so the tape) ran in: the torch layers
            # call backward outside the forward's TF32 scope, where _precision would say IEEE
            tiles, sync = launch.choose(f"{problem.cell}-backward", _tuned_gates(problem.cell),
                                        B, H, _tuned_dtype(problem.dtype, ktape.precision),
                                        dy.device, time_call)
            if problem.cell == "twostage":
                dxw, dh0, (daa, dha, dhh, dbh) = run(ktape, dy, tiles, sync)
                grads = {"weight_aa": daa, "weight_ha": dha, "weight_hh": dhh}
                if dbh is not None:
                    grads["bias_h"] = dbh
                return dxw, (dh0.to(dt),), grads
            dxw, dh0, dc0, dw, db = run(ktape, dy, tiles, sync)
            grads: dict[str, Any] = {"weight_hh": dw}
            if ptape is not None:
                dh0, dw_hh, dw_hr = projected.gradients_out(ptape, dy_h, dh_h, dxw, dw)
                grads = {"weight_hh": dw_hh.to(ptape.w_hh.dtype),
                         "weight_hr": dw_hr.to(ptape.w_hr.dtype)}
        if db is not None:
            grads["bias_hh"] = db
        d0 = (dh0.to(dt), dc0.to(dt)) if problem.cell == "lstm" else (dh0.to(dt),)
        return dxw, d0, grads


_CELL_IDS = {"rnn": 0, "lstm": 1, "gru": 2}


def _tuned_gates(cell: str) -> int:
    """The gate count the tuner keys shapes on (TwoStageRNN: its two products per step)."""
    return 2 if cell == "twostage" else SPECS[cell].gates


def _tuned_dtype(dtype: str, precision: str | None = None) -> str:
    """The dtype the tuner keys shapes on, with the float32 dot's precision where it is not
    IEEE (tf32x3 runs other instructions than IEEE, so its best tiling is chosen apart);
    ``precision`` defaults to the one in force."""
    precision = _precision(dtype) if precision is None else precision
    return dtype if precision == "ieee" else f"{dtype}-{precision}"


def _act_ids(activations: tuple[str, ...]) -> tuple[int, ...]:
    from rnn_gpu.kernels.triton.common import ACTIVATION_IDS

    return tuple(ACTIVATION_IDS[a] for a in activations)


def _precision(dtype: str) -> str:
    """IEEE float32 unless the caller allowed TF32 (DESIGN §3) or chose tf32x3
    (:func:`rnn_gpu.set_float32_precision`): Triton's ``input_precision`` of the float32 dots.
    Ignored for fp16/bf16."""
    return _config.float32_precision() if dtype == "float32" else "ieee"


def _lengths(lengths: np.ndarray | None, device):
    if lengths is None:
        return None
    import torch

    return torch.as_tensor(np.asarray(lengths, dtype=np.int32)).to(device)


def _on(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _capability(device: str) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(int(device.split(":")[1]))
