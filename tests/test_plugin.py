"""A real third-party plugin, installed as a distribution (dist-info with an entry point), is
found through the `rnn_gpu.backends` entry-point group and selected four ways.

Each check runs in a fresh interpreter: the registry loads entry points once per process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SRC = ROOT / "examples" / "plugin" / "rnn_gpu_example_plugin.py"


def _dist_info(site: Path, name: str, entry_points: str) -> None:
    info = site / f"{name}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[rnn_gpu.backends]\n{entry_points}\n")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site directory holding the example plugin, installed as a distribution."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(PLUGIN_SRC, site / PLUGIN_SRC.name)
    _dist_info(site, "rnn_gpu_example_plugin", "example = rnn_gpu_example_plugin:ExampleBackend")
    return site


def _run(site: Path, code: str, env: dict[str, str] | None = None) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "RNN_GPU_BACKEND"}
    environ["PYTHONPATH"] = os.pathsep.join([str(site), environ.get("PYTHONPATH", "")])
    environ.update(env or {})
    prelude = textwrap.dedent("""
        import json, sys, warnings
        import numpy as np
        import rnn_gpu as rg
        from rnn_gpu_example_plugin import ExampleBackend
        x = np.random.default_rng().standard_normal((5, 3, 4)).astype("float32")
        m = rg.RNN(4, 6)
        out = {}
    """)
    script = prelude + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-W", "always", "-c", script], env=environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


def test_plugin_is_registered_through_the_entry_point(site):
    out = _run(site, """
        out["names"] = rg.backends.names()
        out["rows"] = rg.backends.report()
        out["auto"] = (m(x)[0] is not None) and ExampleBackend.calls
    """)
    assert "example" in out["names"] and "numpy" in out["names"]
    row = next(r for r in out["rows"] if r["name"] == "example")
    assert row == {"name": "example", "available": True, "reason": "", "priority": -10,
                   "distribution": "rnn_gpu_example_plugin 0.1.0"}
    assert out["auto"] == 0, "auto selection must prefer the higher-priority numpy backend"


def test_plugin_selected_by_name_matches_numpy(site):
    out = _run(site, """
        y, h = m(x, backend="example")
        y_ref, h_ref = m(x, backend="numpy")
        out["calls"] = ExampleBackend.calls
        out["err"] = float(np.abs(y - y_ref).max() + np.abs(h - h_ref).max())
        ys, hs, tape = m.forward(x, backend="example")
        dx, dh0, grads = m.backward(tape, np.ones_like(ys))
        ys, hs, tape = m.forward(x, backend="numpy")
        dx2, dh02, grads2 = m.backward(tape, np.ones_like(ys))
        out["grad_err"] = float(max(np.abs(grads[k] - grads2[k]).max() for k in grads)
                                + np.abs(dx - dx2).max())
    """)
    assert out["calls"] == 1
    assert out["err"] < 1e-5
    assert out["grad_err"] < 1e-4


def test_plugin_selected_by_use_backend_and_environment(site):
    code = """
        with rg.use_backend("example"):
            m(x)
        out["after_context"] = ExampleBackend.calls
        m(x)
        out["after_plain_call"] = ExampleBackend.calls
    """
    out = _run(site, code)
    assert out["after_context"] == 1
    assert out["after_plain_call"] == 1, "outside the block auto selection applies again"
    out = _run(site, code, env={"RNN_GPU_BACKEND": "example"})
    assert out["after_context"] == 1
    assert out["after_plain_call"] == 2, "RNN_GPU_BACKEND selects the plugin for plain calls"


def test_explicit_plugin_choice_that_cannot_serve_raises_with_its_reason(site):
    out = _run(site, """
        try:
            rg.LSTM(4, 6)(x, backend="example")
            out["error"] = None
        except rg.BackendError as exc:
            out["error"] = str(exc)
    """)
    assert out["error"] is not None
    assert "'example'" in out["error"] and "only implements RNN, not lstm" in out["error"]


def test_broken_plugin_warns_by_name_and_the_rest_still_works(site):
    (site / "rnn_gpu_broken_plugin.py").write_text("raise ImportError('libfoo.so missing')\n")
    _dist_info(site, "rnn_gpu_broken_plugin", "broken = rnn_gpu_broken_plugin:Backend")
    out = _run(site, """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["names"] = rg.backends.names()
        out["warnings"] = [str(w.message) for w in caught]
        out["ok"] = bool(np.isfinite(m(x)[0]).all())
    """)
    assert "broken" not in out["names"] and "example" in out["names"]
    assert any("'broken'" in w and "libfoo.so missing" in w for w in out["warnings"])
    assert out["ok"]


def test_a_broken_plugins_warning_points_at_the_call_that_loaded_it(site):
    """The load warning had stacklevel=3, right for a direct names() only: loaded by a
    layer's call or by report(), it pointed into rnn_gpu's own files."""
    (site / "rnn_gpu_broken_plugin.py").write_text("raise ImportError('libfoo.so missing')\n")
    _dist_info(site, "rnn_gpu_broken_plugin", "broken = rnn_gpu_broken_plugin:Backend")
    for call in ("m(x)", "rg.backends.report()", "rg.backends.get('numpy')"):
        out = _run(site, f"""
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                line = sys._getframe().f_lineno; {call}
            out["line"] = line
            out["where"] = [[w.filename, w.lineno] for w in caught if "'broken'" in str(w.message)]
        """)
        assert out["where"] == [["<string>", out["line"]]], call


def test_rnn_gpu_info_lists_the_plugin(site):
    environ = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-m", "rnn_gpu.cli", "info"], env=environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert ["example", "yes", "-10", "rnn_gpu_example_plugin", "0.1.0"] in [line[:5]
                                                                           for line in lines]
    assert ["numpy", "yes", "0", "rnn-gpu", "0.1.0"] in [line[:5] for line in lines]


@pytest.mark.parametrize("argv,loads", [
    (["--help"], False), (["run", "--help"], False), (["info", "--help"], False),
    (["run"], False),                                 # a usage error: arguments missing
    (["bench", "--threads", "two"], False),           # a usage error: not a number
    (["bench", "--help"], True),                      # its --backend help lists the variants
    (["info"], True),
])
def test_the_command_line_loads_plugins_only_for_a_command_that_needs_them(site, argv, loads):
    """Building the parser read the backends' variants for bench's help, so every command,
    `rnn-gpu --help` and `rnn-gpu run --help` too, imported every plugin (and whatever it
    imports: torch, triton, cupy) before parsing a single argument."""
    marker = site / "imported"
    (site / "rnn_gpu_marker_plugin.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        from rnn_gpu_example_plugin import ExampleBackend as Marker
    """))
    _dist_info(site, "rnn_gpu_marker_plugin", "marker = rnn_gpu_marker_plugin:Marker")
    environ = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-m", "rnn_gpu.cli", *argv], env=environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == (2 if argv in (["run"], ["bench", "--threads", "two"]) else 0), \
        proc.stderr
    assert marker.exists() == loads
    if argv == ["bench", "--help"]:
        assert "cupy:persistent" in " ".join(proc.stdout.split())


def test_a_plugin_cannot_take_a_builtin_name_or_break_the_table(site):
    """Entry points loaded by name, first claim wins: a plugin whose entry point sorted before
    "numpy" and whose backend was named "numpy" displaced the built-in, and the warning blamed
    the built-in. A plugin with priority "5" broke `rnn-gpu info` and every auto-selected
    call."""
    (site / "rnn_gpu_shadow_plugin.py").write_text(textwrap.dedent("""
        from rnn_gpu_example_plugin import ExampleBackend

        class Shadow(ExampleBackend):
            name, priority = "numpy", 50

        class BadPriority(ExampleBackend):
            name, priority = "bad_priority", "5"
    """))
    _dist_info(site, "rnn_gpu_shadow_plugin", "aaa_shadow = rnn_gpu_shadow_plugin:Shadow\n"
                                              "bad = rnn_gpu_shadow_plugin:BadPriority")
    out = _run(site, """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["names"] = rg.backends.names()
            out["rows"] = rg.backends.report()
        out["warnings"] = [str(w.message) for w in caught]
        out["numpy_module"] = type(rg.backends.get("numpy")).__module__
        out["ok"] = bool(np.isfinite(m(x)[0]).all())
    """)
    assert out["numpy_module"] == "rnn_gpu.backends.numpy"
    assert "bad_priority" not in out["names"] and out["ok"]
    assert any("'aaa_shadow'" in w and "from rnn_gpu_shadow_plugin" in w and "'numpy'" in w
               and "from rnn-gpu) already registered" in w for w in out["warnings"])
    assert any("'bad'" in w and "priority '5'" in w for w in out["warnings"])
