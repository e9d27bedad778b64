"""A minimal third-party backend for rnn_gpu: the Elman RNN cell in plain NumPy.

It shows the whole plugin contract (DESIGN §4) in one page:

* a class with ``name``, ``priority``, ``array_kind``;
* ``unavailable_reason()`` and ``not_supported_reasons(problem)`` that say *why* in words;
* ``forward`` / ``backward`` of one layer and direction on the hoisted input ``xw``;
* an entry point in the ``rnn_gpu.backends`` group (see pyproject.toml beside this file).

It serves only ``RNN`` (tanh or relu), float32/float64 on the CPU, without ``lengths``, and
declines everything else with a reason. Its priority is below the built-in numpy backend, so
installing it changes nothing until a user asks for it by name.
"""

from __future__ import annotations

import numpy as np

from rnn_gpu.backends import Backend, Tape


class ExampleBackend(Backend):
    name = "example"
    priority = -10
    array_kind = "numpy"

    calls = 0  # how many forward calls it served (the plugin test reads this)

    def not_supported_reasons(self, problem):
        reasons = []
        if problem.cell != "rnn":
            reasons.append(f"the example plugin only implements RNN, not {problem.cell}")
        if problem.device != "cpu":
            reasons.append("the example plugin runs on the CPU only")
        if problem.dtype not in ("float32", "float64"):
            reasons.append(f"the example plugin computes in float32/float64, not {problem.dtype}")
        if problem.has_lengths:
            reasons.append("the example plugin does not handle lengths")
        return reasons

    def forward(self, problem, xw, weights, state, lengths, *, reverse, keep_tape):
        type(self).calls += 1
        act = np.tanh if problem.activations[0] == "tanh" else (lambda v: np.maximum(v, 0))
        w_hh, b_hh = weights["weight_hh"], weights.get("bias_hh", 0.0)
        h = state[0]
        T = xw.shape[0]
        ys = np.empty((T,) + h.shape, xw.dtype)
        prev = np.empty_like(ys)
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            prev[t] = h
            h = act(xw[t] + h @ w_hh.T + b_hh)
            ys[t] = h
        tape = Tape(self.name, problem, reverse, {"y": ys, "prev": prev, "w": weights})
        return ys, (h,), tape if keep_tape else None

    def backward(self, tape, dy, dstate):
        y, prev, w = tape.data["y"], tape.data["prev"], tape.data["w"]
        tanh = tape.problem.activations[0] == "tanh"
        dxw = np.empty_like(y)
        dh = dstate[0]
        T = y.shape[0]
        for t in (range(T) if tape.reverse else range(T - 1, -1, -1)):
            d = (dh + dy[t]) * ((1 - y[t] ** 2) if tanh else (y[t] > 0))
            dxw[t] = d
            dh = d @ w["weight_hh"]
        flat = dxw.reshape(-1, dxw.shape[-1])
        grads = {"weight_hh": flat.T @ prev.reshape(-1, prev.shape[-1])}
        if "bias_hh" in w:
            grads["bias_hh"] = flat.sum(axis=0)
        return dxw, (dh,), grads
