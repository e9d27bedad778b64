"""What each cell is: gates, parameter names and shapes (DESIGN §2, the single source of truth).

Backends implement the equations; this module only says which parameters a cell has, so that
layers, I/O and the torch drop-ins agree on names and shapes with torch.nn.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("tanh", "sigmoid", "relu")
RNN_NONLINEARITIES = ("tanh", "relu")


@dataclass(frozen=True)
class CellSpec:
    """Static description of one cell type.

    ``kind`` is what backends dispatch on: ``"lstm"``, ``"gru"``, ``"rnn"``, ``"twostage"``.
    ``gates`` is how many H-sized blocks the hoisted input projection has.
    ``input_weight``/``input_bias`` are the base names of the parameters that act on ``x_t``
    (the layer applies them to all time steps as one GEMM); ``recurrent_weights`` and
    ``recurrent_biases`` list the base names the backend receives, each with a shape rule.
    """

    kind: str
    gates: int
    input_weight: str
    input_bias: str
    recurrent_weights: tuple[str, ...]
    recurrent_biases: tuple[str, ...]


LSTM_SPEC = CellSpec("lstm", 4, "weight_ih", "bias_ih", ("weight_hh",), ("bias_hh",))
GRU_SPEC = CellSpec("gru", 3, "weight_ih", "bias_ih", ("weight_hh",), ("bias_hh",))
RNN_SPEC = CellSpec("rnn", 1, "weight_ih", "bias_ih", ("weight_hh",), ("bias_hh",))
TWOSTAGE_SPEC = CellSpec(
    "twostage", 1, "weight_ia", "bias_a", ("weight_aa", "weight_ha", "weight_hh"), ("bias_h",)
)
SPECS = {s.kind: s for s in (LSTM_SPEC, GRU_SPEC, RNN_SPEC, TWOSTAGE_SPEC)}


def parameter_shapes(
    spec: CellSpec, input_size: int, hidden_size: int, proj_size: int, bias: bool
) -> dict[str, tuple[int, ...]]:
    """Base name -> shape for one layer and direction, in torch.nn's order."""
    g, h = spec.gates, hidden_size
    h_out = proj_size or hidden_size
    shapes: dict[str, tuple[int, ...]] = {spec.input_weight: (g * h, input_size)}
    if spec.kind == "twostage":
        shapes.update(weight_aa=(h, h), weight_ha=(h, h), weight_hh=(h, h))
        if bias:
            shapes = {
                "weight_ia": (h, input_size), "weight_aa": (h, h), "bias_a": (h,),
                "weight_ha": (h, h), "weight_hh": (h, h), "bias_h": (h,),
            }
        return shapes
    shapes["weight_hh"] = (g * h, h_out)
    if bias:
        shapes["bias_ih"] = (g * h,)
        shapes["bias_hh"] = (g * h,)
    if proj_size:
        shapes["weight_hr"] = (proj_size, h)
    return shapes


def parameter_name(base: str, layer: int, reverse: bool) -> str:
    return f"{base}_l{layer}{'_reverse' if reverse else ''}"
