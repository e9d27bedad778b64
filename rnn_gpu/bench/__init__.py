"""Benchmarks: our backends side by side with their peers, in one process (DESIGN §5, §7).

The pieces are small on purpose, so that the asv suite and ``rnn-gpu bench`` share them:

* :mod:`.cases`   what is measured: cell x shape x dtype x device x pass (CPU and GPU sets);
* :mod:`.flops`   how much work a case is (GEMM flops, the usual convention);
* :mod:`.timing`  how a call is timed (CPU wall clock; CUDA events on a GPU);
* :mod:`.memory`  the peak GPU memory of a call;
* :mod:`.peers`   who runs a case: our backends through the layers, torch.nn (CPU, cuDNN) as
  the peers;
* :mod:`.threads` the same thread count for every runner;
* :mod:`.report`  the table and the JSON;
* :mod:`.runner`  the loop that checks every runner's answer before it times it.

A runner whose output disagrees with the reference is reported as wrong and never timed.
"""

from .cases import Case, cpu_cases, gpu_cases, parse_shape, quick_cases
from .flops import forward_flops, train_flops
from .report import Row, format_table, machine_info, to_json
from .runner import run

__all__ = ["Case", "Row", "cpu_cases", "forward_flops", "gpu_cases", "format_table", "machine_info",
           "parse_shape", "quick_cases", "run", "to_json", "train_flops"]
