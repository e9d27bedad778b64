"""The lent GPU's script, ``.ci/gpu``, checked on the CPU: every stage in a dry run.

A card is lent for 15 minutes in all, to a fifth of the tasks, and each of its commands runs
one or more stages of ``.ci/gpu``. A misspelt backend variant, a bad shape or a ``-k`` that
selects no test would cost that stage on the card (run 7 lost its first phase-clocks stage to
an argument argparse could not read). With ``RNN_GPU_CI_DRY_RUN=1`` the script checks each
stage's arguments instead of running it: ``rnn-gpu bench --dry-run`` (the cases, the backends
and their variants), ``pytest --collect-only -m gpu`` (the paths and ``-k`` select tests) and
``.ci/phase_clocks.py --dry-run`` (the shape, the variants and their ``-D`` macros).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "gpu"
if not SCRIPT.is_file():
    pytest.skip("no .ci/gpu beside tests/ (an sdist holds no .ci)", allow_module_level=True)
TEXT = SCRIPT.read_text()
# the stages of the script's case statement: "        bench-gru|bench-rnn) ..."
STAGES = [name for names in re.findall(r"^ {8}([a-z0-9|-]+)\) ", TEXT, re.M)
          for name in names.split("|")]
# the named lists: [ "$STAGES" = owed ] && STAGES="tests-cupy phase-clocks bench-cupy-rows"
ALIASES = dict(re.findall(r'^\[ "\$STAGES" = ([a-z-]+) \] && STAGES="([^"]+)"', TEXT, re.M))
DEFAULT = re.search(r"^STAGES=\$\{\*:-([^}]+)\}", TEXT, re.M).group(1)


def test_the_script_names_its_stages_and_lists():
    """The parse above found what it should (a change to the script's layout fails here, not
    silently as an empty dry run)."""
    assert len(STAGES) >= 25 and {"tests-cupy", "bench-lstm", "bench-gru", "bench-rnn",
                                  "phase-clocks", "run-cuda"} <= set(STAGES)
    assert {"owed", "owed-more", "owed-cells", "owed-checks", "owed-lengths",
            "owed-lstm"} <= set(ALIASES)


@pytest.mark.parametrize("name", ["default", *sorted(ALIASES)])
def test_every_list_of_stages_names_stages_the_script_has(name):
    words = (DEFAULT if name == "default" else ALIASES[name]).split()
    assert words and set(words) <= set(STAGES), set(words) - set(STAGES)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """Every stage once, in a dry run: (exit status, the log's text by stage)."""
    out = tmp_path_factory.mktemp("ci_gpu_out")
    env = {**os.environ, "RNN_GPU_CI_DRY_RUN": "1", "OUT": str(out)}
    done = subprocess.run(["bash", str(SCRIPT), *STAGES], capture_output=True, text=True,
                          env=env, timeout=600)
    log = done.stdout + done.stderr
    parts = re.split(r"^=== ([a-z0-9-]+) \(\d\d:\d\d:\d\d\)$", log, flags=re.M)
    by_stage = dict(zip(parts[1::2], parts[2::2]))
    return done.returncode, log, by_stage


def test_the_dry_run_goes_through_every_stage(dry_run):
    rc, log, by_stage = dry_run
    assert rc == 0, log[-3000:]
    assert list(by_stage) == [*STAGES, "done"], log[-3000:]
    for bad in ("unknown stage", "rnn-gpu bench:", "Traceback", "error:", "No such file"):
        assert bad not in log, (bad, log[-3000:])


@pytest.mark.parametrize("stage", [s for s in STAGES if s.startswith("bench-")])
def test_each_bench_stage_asks_for_cases_our_backends_can_be_asked(dry_run, stage):
    """Its arguments parse, every ``--backend NAME:VARIANT`` exists, it times some cases."""
    found = re.search(r"dry run: (\d+) cases on cuda:0, (?:\d+) repeats, runners: (.*)",
                      dry_run[2][stage])
    assert found and int(found.group(1)) > 0, dry_run[2][stage]
    assert re.match(r".*torch-cudnn(, each call split by kernel \(top \d+\))?$", found.group(2))


@pytest.mark.parametrize("stage", [s for s in STAGES if s.startswith("tests")])
def test_each_test_stage_selects_gpu_tests(dry_run, stage):
    text = dry_run[2][stage]
    assert "pytest exit status 0" in text, text
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    assert collected and int(collected.group(1)) > 0, text


def test_the_phase_clocks_stage_checks_each_variant(dry_run):
    text = dry_run[2]["phase-clocks"]
    variants = re.findall(r"^dry run: lstm (float16|bfloat16) ", text, re.M)
    assert variants.count("float16") == TEXT.count("--variant=") and "bfloat16" in variants, text


def test_a_typo_in_a_stage_fails_the_dry_run(tmp_path):
    """The check can fail: a copy of the script with a misspelt variant and a misspelt macro."""
    bad = TEXT.replace("cupy:persistent-mma-train-rows2-wt-wide", "cupy:persistent-mma-wide", 1)
    bad = bad.replace("-DBWD_STAGGER=1", "-DBWD_STAGER=1", 1)
    assert bad.count("persistent-mma-wide") == 1 and "BWD_STAGER" in bad
    script = SCRIPT.parent / f".gpu_typo_{os.getpid()}"    # beside the original: it cds to ..
    script.write_text(bad)
    try:
        env = {**os.environ, "RNN_GPU_CI_DRY_RUN": "1", "OUT": str(tmp_path)}
        done = subprocess.run(["bash", str(script), "bench-cupy-rows", "phase-clocks"],
                              capture_output=True, text=True, env=env, timeout=300)
    finally:
        script.unlink()
    log = done.stdout + done.stderr
    assert "the cupy backend has no variant 'persistent-mma-wide'" in log, log
    assert "'-DBWD_STAGER=1' is not -DNAME for a macro" in log, log
