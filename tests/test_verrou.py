"""Verrou backend plumbing: locating Valgrind, command lines, worker env, running workers.

The launcher is exercised end to end under the REAL ``valgrind --tool=none`` (same plumbing
as Verrou, minus the Verrou options); tests that need Verrou itself skip, with the reason,
when no Valgrind with Verrou is found (``$NANPROBE_VALGRIND``, then ``PATH``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nanprobe import verrou as vr

REPO = Path(__file__).resolve().parents[1]
STOCK_VALGRIND = shutil.which("valgrind")
needs_valgrind = pytest.mark.skipif(STOCK_VALGRIND is None, reason="valgrind is not installed")


def _verrou_valgrind() -> Path | None:
    try:
        path = vr.find_valgrind()
        vr.require_verrou(path)
    except vr.VerrouError:
        return None
    return path


def _no_verrou_reason() -> str:
    try:
        vr.require_verrou(vr.find_valgrind())
    except vr.VerrouError as exc:
        return f"no Valgrind with Verrou: {exc}"
    return ""


VERROU = _verrou_valgrind()
needs_verrou = pytest.mark.skipif(VERROU is None, reason=_no_verrou_reason() or "no Verrou")


def _alive(pid: int) -> bool:
    """Running (not a zombie) process?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


# --------------------------------------------------------------------------- locating


def _link(dir_: Path) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    link = dir_ / "valgrind"
    link.symlink_to(STOCK_VALGRIND)
    return link


@needs_valgrind
def test_find_valgrind_order(tmp_path, monkeypatch):
    explicit, from_env, on_path = (_link(tmp_path / n) for n in ("explicit", "env", "path"))
    monkeypatch.setenv("PATH", str(on_path.parent))
    monkeypatch.delenv(vr.ENV_VALGRIND, raising=False)
    assert vr.find_valgrind() == on_path
    monkeypatch.setenv(vr.ENV_VALGRIND, str(from_env))
    assert vr.find_valgrind() == from_env
    assert vr.find_valgrind(explicit) == explicit
    assert vr.find_valgrind(tmp_path / "explicit") == explicit  # a prefix/bin directory


def test_find_valgrind_errors(tmp_path, monkeypatch):
    with pytest.raises(vr.VerrouError, match="not an executable"):
        vr.find_valgrind(tmp_path / "missing" / "valgrind")
    monkeypatch.setenv(vr.ENV_VALGRIND, str(tmp_path / "nope"))
    with pytest.raises(vr.VerrouError, match=vr.ENV_VALGRIND):
        vr.find_valgrind()
    plain = tmp_path / "valgrind"
    plain.write_text("not executable")
    with pytest.raises(vr.VerrouError, match="not an executable"):
        vr.find_valgrind(plain)
    monkeypatch.delenv(vr.ENV_VALGRIND)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(vr.VerrouError, match="docker") as err:
        vr.find_valgrind()
    assert "\n" not in str(err.value)


@needs_valgrind
def test_stock_valgrind_without_verrou_is_refused():
    stock = Path(STOCK_VALGRIND)
    info = vr.valgrind_info(stock)
    assert info["version"] and info["version"][0].isdigit()
    if info["verrou_version"] is not None:
        pytest.skip(f"{stock} has Verrou")
    with pytest.raises(vr.VerrouError) as err:
        vr.require_verrou(stock)
    msg = str(err.value)
    assert "\n" not in msg and "Verrou" in msg and "docker/Dockerfile" in msg
    assert isinstance(err.value, RuntimeError)
    assert vr.find_pybinding(stock) is None


def test_parse_version():
    assert vr.parse_version("valgrind-3.26.0+verrou-2.7.0\n") == ("3.26.0", "2.7.0")
    assert vr.parse_version("valgrind-3.25.0.verrou-dev") == ("3.25.0", "dev")
    assert vr.parse_version("valgrind-3.19.0") == ("3.19.0", None)
    assert vr.parse_version("nothing") == (None, None)


# --------------------------------------------------------------------------- command line


def test_build_command_verrou(tmp_path):
    exclude = vr.render_exclude(tmp_path / "exclude.txt")
    cmd = vr.build_command("/opt/verrou/bin/valgrind", seed=1234, exclude=exclude,
                           instr_atstart=False, python="/usr/bin/python3", args=("job.json",))
    assert cmd[:2] == ["/opt/verrou/bin/valgrind", "--tool=verrou"]
    for opt in ("--rounding-mode=random", "--vr-seed=1234", "--count-op=no", "--check-nan=no",
                "--check-inf=no", f"--exclude={exclude}", "--instr-atstart=no"):
        assert opt in cmd
    assert not any(a.startswith("--seed") for a in cmd)
    assert cmd[-4:] == ["/usr/bin/python3", "-m", "nanprobe.worker", "job.json"]
    assert max(i for i, a in enumerate(cmd) if a.startswith("--")) < cmd.index("/usr/bin/python3")

    ref = vr.build_command("vg", rounding_mode="nearest", instr_atstart=True, args=("j",))
    assert "--rounding-mode=nearest" in ref and "--instr-atstart=yes" in ref
    assert not any(a.startswith("--vr-seed") or a.startswith("--exclude") for a in ref)
    assert ref[ref.index("--instr-atstart=yes") + 1] == vr.real_python()


def _prefix(root: Path, with_binding: bool) -> Path:
    """An installation prefix: bin/valgrind (a copy of the real one) and maybe the binding."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(STOCK_VALGRIND, root / "bin" / "valgrind")
    (root / "libexec" / "valgrind").mkdir(parents=True)
    if with_binding:
        _binding_dir(root / "lib" / "python3.11" / "site-packages", "")
    return root / "bin" / "valgrind"


@needs_valgrind
def test_instr_atstart_follows_the_python_binding(tmp_path):
    with_binding = _prefix(tmp_path / "a", True)
    without = _prefix(tmp_path / "b", False)
    assert vr.find_pybinding(with_binding) == tmp_path / "a/lib/python3.11/site-packages"
    assert vr.find_pybinding(without) is None
    assert "--instr-atstart=no" in vr.build_command(with_binding, seed=1)
    assert "--instr-atstart=yes" in vr.build_command(without, seed=1)
    assert "--instr-atstart=yes" in vr.build_command(with_binding, seed=1, instr_atstart=True)
    with pytest.raises(vr.VerrouError, match="nothing would be perturbed"):
        vr.build_command(without, seed=1, instr_atstart=False)


def test_build_command_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown Verrou rounding mode"):
        vr.build_command("vg", rounding_mode="stochastic", seed=1)
    with pytest.raises(ValueError, match="needs a seed"):
        vr.build_command("vg", rounding_mode="random")
    with pytest.raises(ValueError, match="seed"):
        vr.build_command("vg", seed=-1)
    with pytest.warns(UserWarning, match="tied"):
        cmd = vr.build_command("vg", rounding_mode="random_det", seed=5)
    assert "--rounding-mode=random_det" in cmd
    with pytest.raises(vr.VerrouError, match="template"):
        vr.build_command("vg", seed=1, exclude=vr.exclude_template())
    with pytest.raises(vr.VerrouError, match="not found"):
        vr.build_command("vg", seed=1, exclude=tmp_path / "missing.txt")
    for mode in ("nearest", "nearness", "upward", "downward", "average"):
        assert mode in vr.ROUNDING_MODES


def test_build_command_tool_none_drops_verrou_options():
    cmd = vr.build_command("valgrind", tool="none", seed=7, exclude="/does/not/matter",
                           extra=("-q",), python="py", module=None, args=("-c", "pass"))
    assert cmd == ["valgrind", "--tool=none", "-q", "py", "-c", "pass"]


# --------------------------------------------------------------------------- env and exclusions


def test_worker_env():
    base = {"PATH": "/usr/bin", "OPENBLAS_CORETYPE": "SkylakeX", "OMP_NUM_THREADS": "8",
            "ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "VERROU_ROUNDING_MODE": "upward", "VERROU_SEED": "1", "KEEP": "me"}
    env = vr.worker_env(base, pybinding_dir="/opt/verrou/lib/python3.11/site-packages")
    assert "OPENBLAS_CORETYPE" not in env and "ATEN_CPU_CAPABILITY" not in env
    assert env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"  # not an AVX-512 override: kept
    assert not [k for k in env if k.startswith("VERROU_")]
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "NANPROBE_THREADS"):
        assert env[name] == "1"
    assert env["KEEP"] == "me" and env["PATH"] == "/usr/bin"
    assert env["NANPROBE_KERNELS"] == "torch"
    assert env[vr.ENV_PYBINDING] == "/opt/verrou/lib/python3.11/site-packages"
    assert base["OPENBLAS_CORETYPE"] == "SkylakeX"  # the caller's mapping is untouched
    assert vr.ENV_PYBINDING not in vr.worker_env(env)


def test_default_exclusions_are_canonical(tmp_path):
    rendered = vr.default_exclude_file(tmp_path / "run" / "verrou_exclude.txt")
    lines = rendered.read_text().splitlines()
    assert all(line for line in lines)  # no blank line reaches Verrou
    rules = [line.split("\t") for line in lines if not line.startswith("#")]
    assert all(len(r) == 2 for r in rules)
    objs = {obj for _, obj in rules}
    for obj in objs:
        assert obj == "*" or (Path(obj).is_file() and os.path.realpath(obj) == obj), obj
    import numpy

    names = " ".join(objs)
    assert vr.real_python() in objs
    assert "libm.so" in names or "libm-" in names
    assert "_multiarray_umath" in names and Path(numpy.__file__).parent.as_posix() in names
    assert "{" not in rendered.read_text()
    cached = vr.default_exclude_file()
    assert cached.read_text() == rendered.read_text()


def test_exclude_template_shipped_and_errors(tmp_path):
    template = vr.exclude_template()
    assert template.is_file() and "{libm}" in template.read_text()
    assert (REPO / "verrou" / "exclude.txt").resolve() == template.resolve()
    custom = tmp_path / "t.txt"
    custom.write_text("# c\n\nexp\t/lib/../lib\n*  {python}\n")
    out = vr.render_exclude(tmp_path / "o.txt", custom).read_text().splitlines()
    assert out[-2:] == [f"exp\t{os.path.realpath('/lib')}", f"*\t{vr.real_python()}"]
    custom.write_text("* {nope}\n")
    with pytest.raises(vr.VerrouError, match="unknown placeholder"):
        vr.render_exclude(tmp_path / "o.txt", custom)
    custom.write_text("onlyone\n")
    with pytest.raises(vr.VerrouError, match="FNNAME OBJNAME"):
        vr.render_exclude(tmp_path / "o.txt", custom)


def test_instrumentation_is_a_noop_outside_valgrind(monkeypatch):
    monkeypatch.setenv(vr.ENV_PYBINDING, "/nonexistent")
    with vr.instrumentation() as active:
        assert active is False
    monkeypatch.delenv(vr.ENV_PYBINDING)
    with vr.instrumentation() as active:
        assert active is False


def _binding_dir(root: Path, body: str) -> Path:
    """A stand-in for Verrou's installed ``valgrind/verrouPyBinding.py`` (no Verrou here)."""
    pkg = root / "valgrind"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "verrouPyBinding.py").write_text(body)
    return root


def test_instrumentation_toggles_the_binding_under_valgrind(tmp_path, monkeypatch):
    body = ("calls = []\n"
            "def start_instrumentation():\n    calls.append('start')\n"
            "def stop_instrumentation():\n    calls.append('stop')\n")
    monkeypatch.setenv("LD_PRELOAD", "/usr/libexec/valgrind/vgpreload_core-amd64-linux.so")
    path = list(sys.path)
    for case, content in (("ok", body), ("exits", "raise SystemExit(42)\n"), ("none", None)):
        monkeypatch.setattr(sys, "path", list(path))
        for name in ("valgrind", "valgrind.verrouPyBinding"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(vr, "_binding", None)
        site = _binding_dir(tmp_path / case, content) if content else tmp_path / case
        monkeypatch.setenv(vr.ENV_PYBINDING, str(site))
        if case != "ok":
            with pytest.raises(vr.VerrouError, match="perturbs nothing"), vr.instrumentation():
                pass
            continue
        with pytest.raises(KeyError), vr.instrumentation() as outer:
            with vr.instrumentation() as inner:
                assert outer and inner
            raise KeyError("the forward failed")  # stop_instrumentation() still runs
        assert sys.modules["valgrind.verrouPyBinding"].calls == ["start", "stop"]
    # no variable: the binding is found next to the Verrou that Valgrind preloads from
    for name in ("valgrind", "valgrind.verrouPyBinding"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(vr, "_binding", None)
    monkeypatch.setattr(sys, "path", list(path))
    monkeypatch.delenv(vr.ENV_PYBINDING)
    prefix = tmp_path / "prefix"
    _binding_dir(prefix / "lib" / "python3.11" / "site-packages", body)
    lib = prefix / "libexec" / "valgrind"
    monkeypatch.setenv("LD_PRELOAD", f"{lib}/vgpreload_core-amd64-linux.so:"
                                     f"{lib}/vgpreload_verrou-amd64-linux.so")
    with vr.instrumentation() as active:
        assert active
    assert sys.modules["valgrind.verrouPyBinding"].calls == ["start", "stop"]
    monkeypatch.setenv("LD_PRELOAD", f"{lib}/vgpreload_core-amd64-linux.so")  # --tool=none
    with vr.instrumentation() as active:
        assert active is False
    for name in ("valgrind", "valgrind.verrouPyBinding"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(vr, "_binding", None)


def test_real_python_is_the_elf_binary():
    path = vr.real_python()
    assert os.path.realpath(path) == path
    assert Path(path).read_bytes()[:4] == b"\x7fELF"


# --------------------------------------------------------------------------- running workers


def test_run_worker_timeout_kills_group_and_retries(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = textwrap.dedent(f"""
        import subprocess, time
        p = subprocess.Popen(["sleep", "60"])
        open({str(pidfile)!r}, "a").write(f"{{p.pid}}\\n")
        print("worker started, now hanging", flush=True)
        time.sleep(60)
    """)
    log = tmp_path / "logs" / "sample-0001.log"
    res = vr.run_worker([sys.executable, "-c", code], None, timeout=2.0, log_path=log,
                        kill_grace=1.0)
    assert res.timed_out and not res.ok
    assert res.attempts == 2
    assert "worker started, now hanging" in res.log_tail
    assert res.seconds < 20
    assert "timed out" in res.describe() and "2 attempts" in res.describe()
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2 and not any(_alive(p) for p in pids)
    assert log.read_text().count("=== nanprobe worker attempt") == 2


def test_run_worker_crash_is_reported_and_retried_once(tmp_path):
    code = "import sys; print('loading model...'); print('boom: bad weights', file=sys.stderr);" \
           " sys.exit(3)"
    res = vr.run_worker([sys.executable, "-c", code], None, timeout=60,
                        log_path=tmp_path / "w.log")
    assert (res.returncode, res.attempts, res.timed_out, res.ok) == (3, 2, False, False)
    assert "boom: bad weights" in res.log_tail and "loading model" in res.log_tail
    assert res.describe().startswith("exit status 3 after 2 attempts")

    seg = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    res = vr.run_worker([sys.executable, "-c", seg], None, timeout=60,
                        log_path=tmp_path / "s.log", retries=0)
    assert res.returncode == -11 and res.attempts == 1 and "SIGSEGV" in res.describe()

    res = vr.run_worker(["/nonexistent/valgrind"], None, timeout=5, log_path=tmp_path / "n.log")
    assert res.returncode is None and "cannot start" in res.log_tail


def test_run_worker_flaky_then_ok(tmp_path):
    marker = tmp_path / "first-try"
    code = (f"import os, sys; m = {str(marker)!r}\n"
            "if not os.path.exists(m):\n    open(m, 'w').close(); sys.exit('first try fails')\n"
            "print('second try ok')")
    res = vr.run_worker([sys.executable, "-c", code], {**os.environ}, timeout=60,
                        log_path=tmp_path / "f.log")
    assert res.ok and res.attempts == 2 and "second try ok" in res.log_tail


WORKER_SCRIPT = """
import json, os, sys
import torch
import nanprobe
from nanprobe.verrou import instrumentation

with instrumentation() as active:
    x = torch.linspace(0, 1, 1001, dtype=torch.float32)
    total = float((x * x).sum())
names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "NANPROBE_THREADS")
rec = {"total": total, "active": active, "prefix": sys.prefix, "nanprobe": nanprobe.__file__,
       "threads": torch.get_num_threads(), "env": {k: os.environ.get(k) for k in names},
       "ld_preload": os.environ.get("LD_PRELOAD", "")}
out = sys.argv[1]
with open(out + ".tmp", "w") as f:
    json.dump(rec, f)
os.replace(out + ".tmp", out)
"""


@pytest.mark.slow
@needs_valgrind
def test_launcher_end_to_end_under_real_valgrind(tmp_path):
    """The real interpreter under ``valgrind --tool=none``, venv and torch included."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    out = tmp_path / "out.json"
    cmd = vr.build_command(vr.find_valgrind(STOCK_VALGRIND), tool="none", module=None,
                           args=(script, out))
    assert cmd[2] == vr.real_python()
    env = vr.worker_env({**os.environ, "OPENBLAS_CORETYPE": "SkylakeX", "OMP_NUM_THREADS": "4"})
    res = vr.run_worker(cmd, env, timeout=300, log_path=tmp_path / "worker.log", cwd=tmp_path)
    assert res.ok, f"{res.describe()}\n{res.log_tail}"
    rec = json.loads(out.read_text())
    assert "vgpreload" in rec["ld_preload"]  # it really ran under Valgrind
    assert rec["prefix"] == sys.prefix  # the venv survived realpath()
    assert Path(rec["nanprobe"]).resolve() == Path(vr.__file__).resolve().parent / "__init__.py"
    assert rec["threads"] == 1 and rec["env"]["OMP_NUM_THREADS"] == "1"
    assert rec["env"]["OPENBLAS_CORETYPE"] is None and rec["env"]["NANPROBE_THREADS"] == "1"
    assert rec["active"] is False  # tool=none, no binding: instrumentation() is a no-op
    x = __import__("torch").linspace(0, 1, 1001, dtype=__import__("torch").float32)
    assert abs(rec["total"] - float((x * x).sum())) < 1e-3
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- Verrou itself

SUM_SCRIPT = """
import json, sys
import torch
from nanprobe.verrou import instrumentation

g = torch.Generator().manual_seed(0)
x = torch.rand(20000, generator=g, dtype=torch.float32)
with instrumentation() as active:
    total = float(x.sum())
with open(sys.argv[1], "w") as f:
    json.dump({"total": float.hex(total), "active": active}, f)
"""


@pytest.mark.slow
@needs_verrou
def test_verrou_random_perturbs_nearest_does_not(tmp_path):
    info = vr.require_verrou(VERROU)
    assert info["verrou_version"]
    script = tmp_path / "sum.py"
    script.write_text(SUM_SCRIPT)
    pybinding = vr.find_pybinding(VERROU)
    exclude = vr.default_exclude_file(tmp_path / "exclude.txt")
    results = {}
    for mode, seed in (("nearest", None), ("random", 11)):
        out = tmp_path / f"{mode}.json"
        cmd = vr.build_command(VERROU, rounding_mode=mode, seed=seed, exclude=exclude,
                               module=None, args=(script, out))
        assert ("--instr-atstart=no" in cmd) is (pybinding is not None)
        res = vr.run_worker(cmd, vr.worker_env(pybinding_dir=pybinding), timeout=600,
                            log_path=tmp_path / f"{mode}.log", retries=0)
        assert res.ok, f"{mode}: {res.describe()}\n{res.log_tail}"
        results[mode] = json.loads(out.read_text())
        assert results[mode]["active"] is (pybinding is not None)
    assert results["random"]["total"] != results["nearest"]["total"]


@needs_verrou
def test_worker_invocation_records_provenance(tmp_path):
    job = tmp_path / "job.json"
    inv = vr.worker_invocation(VERROU, job, seed=99)
    assert "--vr-seed=99" in inv.cmd and inv.cmd[-1] == str(job)
    prov = inv.provenance
    assert prov["seed"] == 99 and prov["verrou_version"] and prov["bit_reproducible"] is False
    assert prov["command"].startswith(str(VERROU))
    assert (tmp_path / "verrou_exclude.txt").is_file() and prov["exclude_rules"]
    ref = vr.worker_invocation(VERROU, job, rounding_mode="nearest")
    assert "--rounding-mode=nearest" in ref.cmd


# --------------------------------------------------------------------------- container


def test_dockerfile_matches_the_launcher():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert f"NANPROBE_VALGRIND={vr.CONTAINER_VALGRIND}" in text
    assert "ARG VALGRIND_VERSION=3.26.0" in text and "ARG VERROU_VERSION=2.7.0" in text
    assert not re.search(r"^\s*ENV\b.*(OPENBLAS_CORETYPE|AVX512)", text, re.M | re.I)
    apptainer = (REPO / "docker" / "nanprobe.def").read_text()
    assert apptainer.startswith("Bootstrap:") or "\nBootstrap:" in apptainer


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_hadolint_dockerfile():
    res = subprocess.run(["hadolint", str(REPO / "docker" / "Dockerfile")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
