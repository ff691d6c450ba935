"""The deployment files (docker-compose.yml, docker/*.Dockerfile, .dockerignore) checked without
a Docker engine: the compose file parses and wires its services as docs/deployment.md says;
every command a service runs exists in its image and its arguments parse (``evomerge`` with our
own parser, ``ray`` with Ray's); every ``EVOMERGE_*`` variable is a setting and its value
validates; the images copy files that exist; the API image installs no torch.

When a ``docker compose`` (v2) happens to be installed, ``docker compose config`` checks the
file against the Compose specification as well.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = {"api": REPO / "docker" / "api.Dockerfile", "worker": REPO / "docker" / "worker.Dockerfile"}
SERVICES = {"postgres", "migrate", "ray-token", "api", "ray-head", "ray-worker"}
RAY_NODES = ("ray-head", "api", "ray-worker")  # the services that run a Ray node
# what each image can run: the programs it installs (console scripts of its packages) and its shell
PROGRAMS = {
    "api": {"evomerge", "ray", "python", "sh"},
    "worker": {"evomerge", "ray", "python", "sh"},
    "postgres": {"pg_isready", "sh"},
}
TORCH_PACKAGES = {"torch", "transformers", "accelerate"}


def _toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(path.read_text())


# ---- reading the files ------------------------------------------------------------------------
_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}`` (``${VAR:+alt}`` too)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("plain"):
            return env.get(match.group("plain"), "")
        expr = match.group("braced")
        name, op, arg = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+]|)(.*)$", expr, re.S).groups()
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?"):
            if not value if op == ":?" else value is None:
                raise AssertionError(f"${{{expr}}}: {name} must be set ({arg})")
            return value or ""
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""

    return _VAR.sub(one, text)


def _interpolate_all(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_all(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_all(v, env) for k, v in node.items()}
    return node


@cache
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@cache
def compose() -> dict[str, Any]:
    """The compose file with every variable at its default (as with no .env file)."""
    return _interpolate_all(compose_raw(), {})


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def image_kind(name: str, service: dict[str, Any]) -> str:
    dockerfile = (service.get("build") or {}).get("dockerfile", "")
    if dockerfile:
        return Path(dockerfile).name.split(".")[0]
    assert service["image"].startswith("postgres:"), f"{name}: an image this test does not know"
    return "postgres"


def as_argv(value: Any) -> list[str]:
    return list(map(str, value)) if isinstance(value, list) else shlex.split(value)


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script made of `&&`, `||`, `;` chains and `if` blocks
    (quotes respected; `exec` and the `if`/`then`/`else`/`fi` words dropped)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in [*lexer, ";"]:
        if token in (";", "&&", "||", "|", "&"):
            while words and words[0] in ("if", "then", "else", "elif", "exec", "!"):
                words = words[1:]
            if words and words != ["fi"]:
                commands.append(words)
            words = []
        else:
            words.append(token)
    return commands


def simple_commands(argv: list[str]) -> list[list[str]]:
    """The programs an argv runs: itself, or each command of an ``sh -c`` script."""
    if argv[:2] in (["sh", "-c"], ["bash", "-c"]):
        assert not re.search(r"`|\$\(", argv[2]), f"no command substitution in `sh -c`: {argv[2]}"
        return shell_commands(argv[2])
    return [argv]


def service_commands(name: str, service: dict[str, Any]) -> list[list[str]]:
    """Every command the service runs: its command (after its entrypoint) and its health check."""
    out = []
    if "entrypoint" in service:
        out += simple_commands(as_argv(service["entrypoint"]))
    if "command" in service:
        out += simple_commands(as_argv(service["command"]))
    test = (service.get("healthcheck") or {}).get("test")
    if test:
        test = as_argv(test)
        if test[0] == "CMD":
            out.append(test[1:])
        elif test[0] == "CMD-SHELL":
            out += simple_commands(["sh", "-c", " ".join(test[1:])])
        else:
            out += simple_commands(test)
    return out


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_args(path: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for instr, rest in dockerfile_instructions(path):
        if instr == "ARG":
            name, equals, default = rest.partition("=")
            out[name.strip()] = (shlex.split(default) or [""])[0] if equals else None
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    out = {}
    for instr, rest in dockerfile_instructions(path):
        if instr == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                out[key] = value
    return out


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings built from exactly these EVOMERGE_* variables, the way a container reads them."""
    for key in list(os.environ):
        if key.startswith("EVOMERGE_") or key == "RAY_ADDRESS":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


# ---- the compose file -------------------------------------------------------------------------
def test_the_compose_file_has_the_deployment_services():
    assert set(services()) == SERVICES
    assert set(compose()["volumes"]) >= {"pgdata", "data", "hf-cache"}
    for name, service in services().items():
        if name != "postgres":
            assert service["build"]["context"] == ".", name
            assert (REPO / service["build"]["dockerfile"]).is_file(), name


def test_health_checks_and_start_order():
    s = services()
    for name in ("postgres", "api", "ray-head"):
        assert s[name]["healthcheck"]["test"], f"{name} needs a health check"
    assert "pg_isready" in " ".join(as_argv(s["postgres"]["healthcheck"]["test"]))
    assert ["ray", "status"] == service_commands("ray-head", s["ray-head"])[-1][:2]
    assert "/health" in " ".join(as_argv(s["api"]["healthcheck"]["test"]))

    def depends(name: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in s[name]["depends_on"].items()}

    assert depends("migrate") == {"postgres": "service_healthy"}
    assert depends("ray-head") == {"ray-token": "service_completed_successfully"}
    assert depends("api") == {"postgres": "service_healthy", "migrate": "service_completed_successfully",
                              "ray-token": "service_completed_successfully", "ray-head": "service_healthy"}
    assert depends("ray-worker") == {"ray-token": "service_completed_successfully",
                                     "ray-head": "service_healthy"}
    for name in s:  # every service waited on for its health has a health check
        for dep, condition in (s[name].get("depends_on") or {}).items():
            if condition.get("condition") == "service_healthy":
                assert s[dep].get("healthcheck"), f"{name} waits for {dep}'s health, which is never checked"
    # the migration and the token run once and are not restarted
    assert s["migrate"]["restart"] == "no" and s["ray-token"]["restart"] == "no"
    assert as_argv(s["migrate"]["command"]) == ["evomerge", "migrate"]


def test_the_worker_reserves_gpus():
    devices = services()["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    (device,) = devices
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == "all" or int(device["count"]) >= 1
    # trials ask Ray for a GPU each, and nothing but the worker has one
    api = environment(services()["api"])
    assert float(api["EVOMERGE_WORKER_NUM_GPUS"]) == 1
    for name in ("api", "ray-head"):
        (start,) = [c for c in service_commands(name, services()[name]) if c[:2] == ["ray", "start"]]
        assert "--num-gpus=0" in start and "--num-cpus=0" in start, f"{name} must take no Ray work"
    # and exports (CPU tasks) cannot land on those CPU-less nodes
    assert float(api["EVOMERGE_WORKER_NUM_CPUS"]) > 0


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_command_exists_in_its_image(name):
    service = services()[name]
    kind = image_kind(name, service)
    commands = service_commands(name, service)
    assert commands, f"{name} runs nothing of its own"
    for argv in commands:
        assert argv[0] in PROGRAMS[kind], f"{name}: {argv[0]!r} is not a program of the {kind} image"
        check_arguments(argv)
    if kind != "postgres":
        scripts = _toml(REPO / "pyproject.toml")["project"]["scripts"]
        assert scripts["evomerge"] == "service.cli:main"
        (ray_script,) = [e for e in metadata.distribution("ray").entry_points
                         if e.group == "console_scripts" and e.name == "ray"]
        assert ray_script.value.startswith("ray.scripts.scripts:")


def check_arguments(argv: list[str]) -> None:
    """The arguments parse: evomerge's with its own parser, ray's with Ray's click commands."""
    program, args = argv[0], argv[1:]
    if program == "evomerge":
        from service.cli import build_parser

        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"`evomerge {shlex.join(args)}` does not parse") from exc
    elif program == "ray":
        from ray.scripts.scripts import cli

        assert args and args[0] in cli.commands, f"`ray {args[0] if args else ''}`: no such command"
        command = cli.commands[args[0]]
        command.make_context(f"ray {args[0]}", list(args[1:]))  # raises on an unknown option
        address = next((a.split("=", 1)[1] for a in args if a.startswith("--address=")), None)
        if address is not None:
            check_ray_address(address)
    elif program == "python":
        assert args[0] == "-c", argv
        compile(args[1], "<healthcheck>", "exec")


def check_ray_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if host in ("127.0.0.1", "localhost"):
        return
    assert host in services(), f"Ray address {address}: no service {host!r}"
    head = as_argv(services()[host]["command"])
    assert "--head" in head and f"--port={port}" in head, f"{address} is not the Ray head's GCS port"


def test_the_ray_head_address_is_the_same_everywhere():
    api = services()["api"]
    (start,) = [c for c in service_commands("api", api) if c[:2] == ["ray", "start"]]
    assert f"--address={environment(api)['EVOMERGE_RAY_ADDRESS']}" in start
    (worker_start,) = [c for c in service_commands("ray-worker", services()["ray-worker"])
                       if c[:2] == ["ray", "start"]]
    assert f"--address={environment(api)['EVOMERGE_RAY_ADDRESS']}" in worker_start
    assert "--block" in worker_start
    # the API container joins the cluster first (a Ray driver needs a local raylet), then serves
    assert [c[:2] for c in service_commands("api", api)][:2] == [["ray", "start"], ["evomerge", "serve"]]


def ray_token_script() -> str:
    argv = as_argv(services()["ray-token"]["command"])
    assert argv[:2] == ["python", "-c"], argv
    return argv[2]


def test_ray_token_auth_is_on_and_every_ray_node_shares_one_token():
    """Ray's token auth is on in the deployment, whatever .env says, and every Ray node (head, API,
    workers) reads the one token file that the one-shot ray-token service generated, from the same
    volume; the token itself is never in the compose file or in .env."""
    for env in ({}, {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t0k"}):
        s = _interpolate_all(compose_raw(), env)["services"]
        for name in (*RAY_NODES, "ray-token"):
            values = environment(s[name])
            assert values.get("RAY_AUTH_MODE") == "token", (name, env)
            assert "RAY_AUTH_TOKEN" not in values, name
    (path,) = {environment(services()[n])["RAY_AUTH_TOKEN_PATH"] for n in (*RAY_NODES, "ray-token")}
    folder = str(PurePosixPath(path).parent)
    assert "ray-auth" in compose()["volumes"]
    assert mounts(services()["ray-token"])[folder] == ("ray-auth", False)
    for name in RAY_NODES:
        assert mounts(services()[name])[folder] == ("ray-auth", True), f"{name} reads the token, read-only"
        condition = services()[name]["depends_on"]["ray-token"]["condition"]
        assert condition == "service_completed_successfully", name
    # every service that runs Ray (a `ray` command, or `evomerge serve`: a Ray driver) is one of them
    for name, service in services().items():
        commands = service_commands(name, service)
        runs_ray = any(c[0] == "ray" or c[:2] == ["evomerge", "serve"] for c in commands)
        assert runs_ray == (name in RAY_NODES), name
    # the one-shot runs as the image's user, who owns the volume's mount point (a new named volume
    # takes it from the image), and the Ray nodes of both images run as that user
    runs = " ".join(rest for instr, rest in dockerfile_instructions(DOCKERFILES["api"]) if instr == "RUN")
    assert re.search(rf"mkdir -p [^&]*{folder}\b", runs)
    assert re.search(rf"chown evomerge:evomerge [^&]*{folder}\b", runs)
    for path_ in DOCKERFILES.values():
        users = [rest for instr, rest in dockerfile_instructions(path_) if instr == "USER"]
        assert users == ["evomerge"], path_


def test_the_ray_token_is_generated_once_and_never_printed(tmp_path):
    token_path = tmp_path / "token"
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(token_path)}
    command = [sys.executable, "-c", ray_token_script()]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    token = token_path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token), "256 random bits, in hex"
    assert token_path.stat().st_mode & 0o777 == 0o600
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert token_path.read_text() == token, "a restart keeps the token"
    assert token not in first.stdout + first.stderr + again.stdout + again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


# ---- settings ---------------------------------------------------------------------------------
def evomerge_variables() -> list[tuple[str, dict[str, str]]]:
    out = [(f"compose:{name}", evomerge_only(environment(s))) for name, s in services().items()]
    out += [(f"{kind}.Dockerfile", evomerge_only(dockerfile_env(path))) for kind, path in DOCKERFILES.items()]
    return out


def evomerge_only(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("EVOMERGE_")}


@pytest.mark.parametrize(("where", "env"), evomerge_variables(), ids=[w for w, _ in evomerge_variables()])
def test_every_evomerge_variable_is_a_setting_and_validates(where, env, monkeypatch):
    for key in env:
        field = key.removeprefix("EVOMERGE_").lower()
        assert field in Settings.model_fields, f"{where}: {key} is not a setting (service/settings.py)"
    settings = settings_from(env, monkeypatch)  # raises ValidationError on a bad value
    for key, value in env.items():
        if value.strip():
            assert getattr(settings, key.removeprefix("EVOMERGE_").lower()) not in (None, ""), key


def test_the_api_settings_are_a_real_deployment(monkeypatch):
    env = {**dockerfile_env(DOCKERFILES["api"]), **environment(services()["api"])}
    settings = settings_from(evomerge_only(env), monkeypatch)
    settings.check()  # refuses auth off on a public host
    assert settings.auth and settings.host == "0.0.0.0"
    from service.db.engine import normalize_url

    url = normalize_url(settings.database_url)
    assert url.drivername == "postgresql+psycopg" and url.host == "postgres"
    postgres = environment(services()["postgres"])
    assert (url.username, url.password, url.database) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])
    # the same database for the one-shot migration
    assert environment(services()["migrate"])["EVOMERGE_DATABASE_URL"] == settings.database_url
    # the published port and the health check are the port the API listens on
    assert any(str(p).endswith(f":{settings.port}") for p in services()["api"]["ports"])
    assert f":{settings.port}/health" in " ".join(as_argv(services()["api"]["healthcheck"]["test"]))


def test_the_password_can_be_set_in_one_place(monkeypatch):
    text = interpolate(COMPOSE.read_text(), {"POSTGRES_PASSWORD": "s3cret"})
    s = yaml.safe_load(text)["services"]
    assert s["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    assert ":s3cret@postgres:" in s["api"]["environment"]["EVOMERGE_DATABASE_URL"]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) of a service's short-syntax volumes."""
    out = {}
    for item in service.get("volumes") or []:
        source, target, *mode = str(item).split(":")
        out[target] = (source, bool(mode) and "ro" in mode[0].split(","))
    return out


def test_api_and_workers_see_the_same_files(monkeypatch):
    """Recipes name models by path and exports are written by a worker, served by the API:
    models, data (exports) and the hub cache are the same volumes at the same paths."""
    api, worker = services()["api"], services()["ray-worker"]
    settings = settings_from(evomerge_only(environment(api)), monkeypatch)
    api_mounts, worker_mounts = mounts(api), mounts(worker)
    for root in settings.model_roots:
        assert str(root) in api_mounts and api_mounts[str(root)] == worker_mounts.get(str(root)), root
        assert api_mounts[str(root)][1], f"models at {root} are mounted read-only"
    data = str(settings.data_dir)
    assert data in api_mounts and api_mounts[data] == worker_mounts[data] and not api_mounts[data][1]
    assert api_mounts[data][0] in compose()["volumes"]
    hf = environment(api)["HF_HOME"]
    assert hf == environment(worker)["HF_HOME"] and api_mounts[hf] == worker_mounts[hf]


# ---- the images -------------------------------------------------------------------------------
def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_the_images_copy_files_that_exist(kind):
    from fnmatch import fnmatch

    copied = []
    for instr, rest in dockerfile_instructions(DOCKERFILES[kind]):
        if instr in ("COPY", "ADD"):
            words = shlex.split(rest)
            assert not any(w.startswith("--from") for w in words), "no multi-stage copies expected"
            copied += [w for w in words if not w.startswith("--")][:-1]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), f"{kind}.Dockerfile copies {source}, which is not in the repository"
        for pattern in dockerignore_patterns():
            assert not fnmatch(source, pattern.lstrip("/")), f"{source} is excluded by .dockerignore"
    # everything `pip install .` packages is copied
    packages = _toml(REPO / "pyproject.toml")["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in packages:
        assert package.rstrip("*") in copied, f"{kind}.Dockerfile does not copy {package}"
    assert "pyproject.toml" in copied


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN instructions."""
    return [words[2:] for instr, rest in dockerfile_instructions(path) if instr == "RUN"
            for words in shell_commands(rest) if words[:2] == ["pip", "install"]]


def test_the_api_image_installs_no_torch():
    installs = pip_installs(DOCKERFILES["api"])
    assert installs
    for args in installs:
        for arg in args:
            assert not any(p in arg for p in (*TORCH_PACKAGES, "TORCH", "[worker", "[dev")), arg
    # and the base install (no extras) does not pull torch in, even indirectly
    reached = dependency_closure(project_requirements())
    assert not reached & TORCH_PACKAGES, f"the base install pulls in {reached & TORCH_PACKAGES}"
    assert {"ray", "lm-eval", "fastapi", "psycopg"} <= reached
    assert TORCH_PACKAGES <= dependency_closure(project_requirements("worker"))


def test_the_api_process_imports_no_torch():
    code = ("import sys, service.app, service.controller, service.export_runner, workers.pool, "
            "service.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'accelerate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def project_requirements(extra: str | None = None) -> list[Requirement]:
    project = _toml(REPO / "pyproject.toml")["project"]
    items = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return [Requirement(item) for item in items]


def dependency_closure(requirements: list[Requirement]) -> set[str]:
    """Names of the distributions these requirements install, from the installed metadata
    (what pip would resolve here; requirements not installed are counted but not followed)."""
    seen: set[str] = set()
    stack = list(requirements)
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        if name == "evomerge":  # a self-reference: its extras' requirements
            for extra in req.extras:
                stack += project_requirements(extra)
            continue
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                stack.append(sub)
    return {k.split("[")[0] for k in seen}


def test_the_worker_image_pins_torch_like_the_makefile():
    args = dockerfile_args(DOCKERFILES["worker"])
    makefile = (REPO / "Makefile").read_text()
    make_torch = re.search(r"^TORCH_SPEC \?= (.+)$", makefile, re.M).group(1).strip()
    assert args["TORCH_SPEC"] == make_torch
    build = services()["ray-worker"]["build"]["args"]
    assert build["TORCH_SPEC"] == make_torch
    installs = pip_installs(DOCKERFILES["worker"])
    assert any("$TORCH_SPEC" in a for args_ in installs for a in args_), "torch is installed from TORCH_SPEC"
    assert any(a.endswith("[worker]") for args_ in installs for a in args_), "the worker extra is installed"


def test_both_images_run_the_same_python_and_ray():
    """Ray drivers (the API) and workers must run the same Python and Ray versions."""
    api, worker = dockerfile_args(DOCKERFILES["api"]), dockerfile_args(DOCKERFILES["worker"])
    for arg in ("PYTHON_VERSION", "RAY_VERSION"):
        assert api[arg] and api[arg] == worker[arg], arg
    froms = {kind: [rest for instr, rest in dockerfile_instructions(p) if instr == "FROM"]
             for kind, p in DOCKERFILES.items()}
    assert froms["api"] == froms["worker"]
    for name, service in services().items():
        if "build" in service:
            build_args = service["build"].get("args") or {}
            declared = dockerfile_args(REPO / service["build"]["dockerfile"])
            assert set(build_args) <= set(declared), f"{name}: build args the Dockerfile does not declare"
            for arg in ("PYTHON_VERSION", "RAY_VERSION"):
                assert build_args[arg] == api[arg], (name, arg)
    for args_ in pip_installs(DOCKERFILES["api"]) + pip_installs(DOCKERFILES["worker"]):
        for a in args_:
            if a.startswith("ray"):
                assert a.endswith("==${RAY_VERSION}"), a


# ---- the documentation ------------------------------------------------------------------------
def documented_commands() -> list[str]:
    """Commands in docs/deployment.md: the lines of its code blocks and its inline code."""
    text = (REPO / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    inline = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return [c for c in lines + inline if c]


def test_the_documented_evomerge_commands_exist():
    found = 0
    for command in documented_commands():
        match = re.match(r"docker compose (?:run --rm|exec(?: -T)?) ([\w-]+) (evomerge .*)$", command)
        if match:
            service, argv = match.group(1), shlex.split(match.group(2))
            assert service in SERVICES, command
            check_arguments(argv)
            found += 1
    assert found >= 3  # token create, list, revoke at least


# ---- the real thing, when it is installed -----------------------------------------------------
def docker_compose() -> list[str] | None:
    if shutil.which("docker"):
        out = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if out.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        out = subprocess.run(["docker-compose", "version"], capture_output=True, text=True)
        if out.returncode == 0 and "v2." in out.stdout:
            return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_it(tmp_path):
    command = docker_compose()
    if command is None:
        pytest.skip("docker compose (v2) is not installed: the Compose specification check NOT RUN")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "EVOMERGE_"))}
    out = subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
