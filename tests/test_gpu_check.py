"""benchmarks/gpu_check.sh, the lent-GPU session's one script, planned without a GPU (DRY_RUN=1): the stage order
of each profile, the deadline that keeps a run inside a device call, and that every file a stage names exists."""
import os
import re
import sys
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def plan(tmp_path, **env):
    """-> (stages in run order as (name, limit or None when skipped), the commands, the whole output)."""
    full = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), **env)
    res = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    stages, commands = [], []
    for line in res.stdout.splitlines():
        if m := re.match(r"=== (\w+) \(limit (\d+)s\)$", line):
            stages.append((m[1], int(m[2])))
        elif m := re.match(r"=== (\w+) skipped: ", line):
            stages.append((m[1], None))
        elif line.startswith("    "):
            commands.append(line.strip())
    return stages, commands, res.stdout


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_first_profile_times_the_step_right_after_the_build(tmp_path):
    stages, commands, _ = plan(tmp_path, PROFILE="first", DEADLINE="0")
    names = [n for n, _ in stages]
    assert names[:4] == ["wheels", "build", "throw_check", "bench_step"]
    assert names.index("tests_new") > names.index("bench_step")
    step = next(c for c in commands if "bench_step.py" in c)
    # both references first, then the fast config's graphed step, the compiled fast step last
    assert re.search(r"--variants ref_tf32,ref_compile,fast_best_graph,\S*,fast_compile_graph ", step)
    assert "--mixed 6 --mixed-variants ref_tf32,fast_best_graph" in step and "--iters 20" in step
    tests_new = next(c for c in commands if "tests/test_graphs.py" in c)
    assert tests_new.index("test_graphs.py") < tests_new.index("test_assignment.py")  # graph tests first


def test_default_check_profile_covers_the_issue_within_8_minutes(tmp_path):
    """The default profile: the step benchmark (both references, the fast config's graphed step, fixed and mixed
    shapes) first, then all CUDA tests, the kernel benchmarks, charts and DALI, under the 470 s deadline."""
    stages, commands, out = plan(tmp_path, DEADLINE="0")
    assert "PROFILE=check" in out
    names = [n for n, _ in stages]
    assert names[:3] == ["wheels", "build", "bench_step"]
    assert names.index("tests") < names.index("bench_ops") < names.index("charts")
    step = next(c for c in commands if "bench_step.py" in c)
    assert "--variants ref_tf32,ref_compile,fast_best_graph " in step
    assert "--mixed 6 --mixed-variants ref_tf32,fast_best_graph" in step
    tests = next(c for c in commands if "-m pytest" in c)
    assert tests.rstrip().endswith(" tests") and "-m needs_cuda" in tests
    _, _, out = plan(tmp_path)
    assert "DEADLINE=470s" in out


def test_second_profile_starts_with_the_compiled_reference(tmp_path):
    stages, commands, _ = plan(tmp_path, PROFILE="second", DEADLINE="0")
    assert [n for n, _ in stages][:2] == ["build", "bench_step"]
    step = next(c for c in commands if "bench_step.py" in c)
    assert "--variants ref_compile,fast_best_graph," in step


@pytest.mark.parametrize("deadline", [100, 400, 470])
def test_deadline_cuts_and_skips_but_the_summary_prints(tmp_path, deadline):
    """The dry run assumes each stage takes its whole limit: the stages' limits never add up past the deadline, a
    stage with under 30 s left is skipped, and the summary lists every stage either way."""
    stages, _, out = plan(tmp_path, PROFILE="first", DEADLINE=str(deadline))
    ran = [limit for _, limit in stages if limit is not None]
    assert sum(ran) <= deadline
    assert all(limit >= 30 for limit in ran)
    skipped = [n for n, limit in stages if limit is None]
    assert skipped, "every profile's worst case is longer than 470 s: something must be skipped"
    summary = out[out.index("=== summary"):]
    for name, _ in stages:
        assert re.search(rf"^{name}\s", summary, re.M), name


def test_no_deadline_runs_every_stage_of_the_full_profile(tmp_path):
    stages, _, _ = plan(tmp_path, PROFILE="all")
    assert all(limit is not None for _, limit in stages)
    assert {"build", "validate", "tests", "bench_ops", "bench_step", "charts"} <= {n for n, _ in stages}


@pytest.mark.parametrize("profile", ["check", "first", "second", "all"])
def test_every_file_a_stage_names_exists(tmp_path, profile):
    _, commands, _ = plan(tmp_path, PROFILE=profile, DEADLINE="0")
    named = {p for c in commands for p in re.findall(r"\b((?:benchmarks|tests)/[\w/]+\.py)\b", c)}
    assert named, commands
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing
    # and every bench_step variant it names exists
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_step import VARIANTS

    step = next(c for c in commands if "bench_step.py" in c)
    names = [v for flag in ("--variants", "--mixed-variants") for m in re.findall(flag + r" (\S+)", step)
             for v in m.split(",")]
    assert names and not [v for v in names if v not in VARIANTS]


@pytest.mark.parametrize("env", [{"PROFILE": "fastest"}, {"PROFILE": "first", "DEADLINE": "soon"}])
def test_bad_settings_are_refused(tmp_path, env):
    full = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), **env)
    res = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "must be" in res.stdout


def test_prebuilt_extension_stamp(tmp_path):
    """benchmarks/ext_stamp.py: a stamp written for a _C.so fits until the .so, the sources' hash, torch or the
    architectures differ; gpu_check.sh's build stage builds from source whenever `check` fails."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ext_stamp

    d = tmp_path / "ext"
    d.mkdir()
    assert ext_stamp.mismatches(d) and ext_stamp.main(["check", str(d)]) == 1  # nothing there
    with pytest.raises(FileNotFoundError):
        ext_stamp.write(d, "9.0")
    (d / "_C.so").write_bytes(os.urandom(64))
    stamp = ext_stamp.write(d, "9.0")
    assert stamp["sources"] == ext_stamp.source_hash() and len(stamp["sources"]) == 64
    assert ext_stamp.mismatches(d, "9.0") == [] and ext_stamp.main(["check", str(d), "--arch", "9.0"]) == 0
    assert any(m.startswith("arch:") for m in ext_stamp.mismatches(d, "8.0;9.0"))
    for key, value in [("sources", "0" * 64), ("torch", "2.0.0"), ("torch_git", "abc")]:
        (d / "stamp.json").write_text(json.dumps(dict(stamp, **{key: value})))
        assert [m.split(":")[0] for m in ext_stamp.mismatches(d, "9.0")] == [key]
    (d / "stamp.json").write_text(json.dumps(stamp))
    (d / "_C.so").write_bytes(os.urandom(64))  # another build under the same stamp
    assert [m.split(":")[0] for m in ext_stamp.mismatches(d, "9.0")] == ["so_sha256"]
    (d / "stamp.json").write_text("{not json")
    assert "unreadable" in ext_stamp.mismatches(d, "9.0")[0]
    # every source of the extension is in the hash: a .cuh header too
    names = {p.relative_to(ROOT).as_posix() for p in ext_stamp.source_files()}
    assert "setup.py" in names and any(n.endswith(".cuh") for n in names) and any(n.endswith(".cu") for n in names)
