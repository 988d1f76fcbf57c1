"""The deployment files under deploy/: what can be checked without a Docker engine or a
Kubernetes cluster — they parse, they fit together, and they keep the scheduler private."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from dask.utils import parse_bytes

from cluster_helpers import REPO_ROOT, TLSFiles, tls_environment

DEPLOY = REPO_ROOT / "deploy"
SCHEDULER_PORT = 8786


def load(name):
    return yaml.safe_load((DEPLOY / name).read_text())


def dask_cli_options(command):
    """Every option the ``dask scheduler`` / ``dask worker`` command line accepts."""
    if command == "scheduler":
        from distributed.cli.dask_scheduler import main
    else:
        from distributed.cli.dask_worker import main
    return {opt for p in main.params for opt in p.opts + p.secondary_opts}


def assert_valid_dask_command(args):
    assert args[:1] == ["dask"] and args[1] in ("scheduler", "worker"), args
    options = dask_cli_options(args[1])
    used = [a for a in args[2:] if a.startswith("--")]
    unknown = [a for a in used if a.split("=", 1)[0] not in options]
    assert not unknown, f"dask {args[1]} has no option {unknown}"


def as_list(command):
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(args, name):
    return args[args.index(name) + 1]


def published_ports(service):
    """(host_ip, published, target) for every port a compose service publishes."""
    out = []
    for spec in service.get("ports", []) or []:
        if isinstance(spec, dict):
            out.append((spec.get("host_ip", ""), str(spec.get("published", "")), str(spec["target"])))
            continue
        parts = str(spec).split("/")[0].split(":")
        if len(parts) == 1:
            out.append(("", "", parts[0]))
        elif len(parts) == 2:
            out.append(("", parts[0], parts[1]))
        else:
            out.append((":".join(parts[:-2]), parts[-2], parts[-1]))
    return out


# --------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose():
    return load("docker-compose.yml")


@pytest.fixture(scope="module")
def compose_tls():
    return load("docker-compose.tls.yml")


def dask_workers(services):
    return {
        name: s for name, s in services.items() if as_list(s.get("command", []))[:2] == ["dask", "worker"]
    }


def test_compose_has_the_services_of_a_deployment(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "dask-scheduler", "prefect-worker"} <= set(services)
    assert len(dask_workers(services)) == 2
    # the Prefect server keeps its state in PostgreSQL
    env = services["prefect-server"]["environment"]
    assert env["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert env["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    assert "postgres" in services["prefect-server"]["depends_on"]
    assert services["postgres"]["image"].startswith("postgres:")
    # the password comes from the environment, never from the file
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    # a process worker runs the flows against the Dask cluster
    worker = as_list(services["prefect-worker"]["command"])
    assert worker[:3] == ["prefect", "worker", "start"] and option(worker, "--type") == "process"
    assert services["prefect-worker"]["environment"]["DASK_SCHEDULER_ADDRESS"] == (
        f"tcp://dask-scheduler:{SCHEDULER_PORT}"
    )


def test_compose_never_publishes_the_scheduler(compose, compose_tls):
    for services in (compose["services"], compose_tls["services"]):
        scheduler = services["dask-scheduler"]
        assert "ports" not in scheduler
        for name, service in services.items():
            for host_ip, published, target in published_ports(service):
                assert str(SCHEDULER_PORT) not in (published, target), name
                # whatever is published is on the host's loopback only
                assert host_ip == "127.0.0.1", (name, host_ip, published)
    # the dashboards (which also report task details) stay inside their containers
    for name, service in compose["services"].items():
        args = as_list(service.get("command", []))
        if args[:1] == ["dask"]:
            assert option(args, "--dashboard-address").startswith("127.0.0.1:"), name


def test_compose_dask_processes_find_each_other(compose):
    services = compose["services"]
    scheduler = as_list(services["dask-scheduler"]["command"])
    assert_valid_dask_command(scheduler)
    assert option(scheduler, "--port") == str(SCHEDULER_PORT)
    scheduler_networks = set(services["dask-scheduler"]["networks"])
    for name, service in dask_workers(services).items():
        args = as_list(service["command"])
        assert_valid_dask_command(args)
        assert args[2] == f"tcp://dask-scheduler:{SCHEDULER_PORT}", name
        assert scheduler_networks & set(service["networks"]), name
        assert service["volumes"] == services["prefect-worker"]["volumes"]  # same data paths
        limit = service["deploy"]["resources"]["limits"]["memory"]
        memory = option(args, "--memory-limit")
        default = lambda s: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", s)  # noqa: E731
        assert parse_bytes(default(memory)) < parse_bytes(default(limit) + "B"), name
    assert scheduler_networks & set(services["prefect-worker"]["networks"])
    # the database is not on the Dask network
    assert not scheduler_networks & set(services["postgres"]["networks"])


def test_compose_tls_override_matches_what_the_tls_test_runs(compose, compose_tls):
    services = compose_tls["services"]
    tls_env = compose_tls["x-tls"]
    # the same settings the TLS test gives its scheduler and workers
    files = TLSFiles(Path("/certs/ca.pem"), Path("/certs/node.pem"), Path("/certs/node-key.pem"))
    tested = tls_environment(files)
    assert set(tls_env) == set(tested)
    for key, value in tested.items():
        if "CLIENT" not in key:
            assert tls_env[key] == value, key
    scheduler = as_list(services["dask-scheduler"]["command"])
    assert_valid_dask_command(scheduler)
    assert option(scheduler, "--protocol") == "tls"
    for name in dask_workers(compose["services"]):
        args = as_list(services[name]["command"])
        assert_valid_dask_command(args)
        assert args[2] == f"tls://dask-scheduler:{SCHEDULER_PORT}"
        assert services[name]["environment"] == tls_env
    client = services["prefect-worker"]["environment"]
    assert client["DASK_SCHEDULER_ADDRESS"] == f"tls://dask-scheduler:{SCHEDULER_PORT}"
    assert client["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    for key in ("CA_FILE", "CLIENT__CERT", "CLIENT__KEY"):
        assert client[f"DASK_DISTRIBUTED__COMM__TLS__{key}"].startswith("/certs/")


# --------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------


def dockerfile_instructions():
    # Docker drops comment lines, also inside an instruction continued over several lines
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.strip().startswith("#"))
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_what_exists_installs_the_flows_and_drops_root():
    instructions = dockerfile_instructions()
    # copies from the build context (not from the build stage)
    copies = [rest.split() for word, rest in instructions
              if word == "COPY" and not rest.startswith("--from=")]
    assert copies
    for parts in copies:
        for source in parts[:-1]:
            assert (REPO_ROOT / source).exists(), source
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    # a wheel with the compiled kernels, built in a stage of its own, then installed with
    # the flows' extra (Prefect) into the final image
    assert "pip wheel" in runs and "setup.py" in " ".join(" ".join(c) for c in copies)
    assert "[pipelines]" in runs and "/wheels/emdask-" in runs
    stages = [rest for word, rest in instructions if word == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert instructions[0][0] == "FROM"
    # the build context sends only what the image copies
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("**") if "**" in ignore else 0] == "**"
    for parts in copies:
        for source in parts[:-1]:
            assert f"!{source}" in ignore or f"!{source}/**" in ignore, source


# --------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------


JOB_VARIABLES = "prefect-job-variables.yaml"  # not a manifest: values for the work pool


def k8s_documents():
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        if path.name == JOB_VARIABLES:
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def quantity(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for unit, factor in units.items():
        if str(q).endswith(unit):
            return float(str(q)[: -len(unit)]) * factor
    return float(q)


def test_kubernetes_manifests_parse_and_fit_together():
    docs = k8s_documents()
    by_kind = {}
    for name, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), name
        by_kind.setdefault(doc["kind"], []).append(doc)
    (cluster,) = by_kind["DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    assert {d["metadata"]["name"] for d in by_kind["Namespace"]} == {namespace}
    spec = cluster["spec"]
    assert spec["worker"]["replicas"] >= 2

    # the scheduler is reachable inside the Kubernetes cluster only
    service = spec["scheduler"]["service"]
    assert service["type"] == "ClusterIP"
    assert service["selector"]["dask.org/cluster-name"] == name
    assert SCHEDULER_PORT in [p["port"] for p in service["ports"]]
    (policy,) = by_kind["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"]["dask.org/cluster-name"] == name
    assert policy["metadata"]["namespace"] == namespace
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer and "namespaceSelector" not in peer

    (scheduler,) = spec["scheduler"]["spec"]["containers"]
    assert_valid_dask_command(scheduler["args"])
    (worker,) = spec["worker"]["spec"]["containers"]
    assert_valid_dask_command(worker["args"])
    memory = parse_bytes(option(worker["args"], "--memory-limit"))
    assert memory < quantity(worker["resources"]["limits"]["memory"])

    # flow runs use the same image and find the scheduler through its Service
    job = yaml.safe_load((DEPLOY / "kubernetes" / JOB_VARIABLES).read_text())
    assert job["image"] == scheduler["image"] == worker["image"]
    assert job["namespace"] == namespace
    assert job["env"]["DASK_SCHEDULER_ADDRESS"] == (
        f"tcp://{name}-scheduler.{namespace}.svc.cluster.local:{SCHEDULER_PORT}"
    )
    accounts = {d["metadata"]["name"] for d in by_kind["ServiceAccount"]}
    assert job["service_account_name"] in accounts
    (deployment,) = by_kind["Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["prefect", "worker", "start"] and option(args, "--type") == "kubernetes"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] in accounts


# --------------------------------------------------------------------------------------
# Prefect deployments
# --------------------------------------------------------------------------------------


def test_every_deployment_entrypoint_is_a_flow_that_accepts_its_parameters(compose):
    import importlib

    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    spec = load("prefect.yaml")
    deployments = spec["deployments"]
    assert deployments
    pools = {d["work_pool"]["name"] for d in deployments}
    # the compose file's Prefect worker serves the deployments' pool
    worker = as_list(compose["services"]["prefect-worker"]["command"])
    assert pools == {option(worker, "--pool")}
    mounted = {v.split(":")[1] for v in compose["services"]["prefect-worker"]["volumes"]}
    for d in deployments:
        module, _, name = d["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module), name)
        assert isinstance(flow, Flow), d["entrypoint"]
        parameters = d.get("parameters", {})
        validated = flow.validate_parameters(parameters)  # raises on a name or a type
        # one parameter points a flow at a cluster; the deployment leaves it to the worker's
        # DASK_SCHEDULER_ADDRESS
        assert "dask_address" in validated and "dask_address" not in parameters
        with pytest.raises(Exception):
            flow.validate_parameters({**parameters, "not_a_parameter": 1})
        for schedule in d.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
        # paths the deployment reads and writes are on the volume workers and flows share
        for key in ("source", "dest", "image", "out"):
            if key in parameters:
                assert any(parameters[key].startswith(m + "/") for m in mounted), parameters[key]


# --------------------------------------------------------------------------------------
# Security properties of the code
# --------------------------------------------------------------------------------------

SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
               ("subprocess", "getstatusoutput")}
PICKLERS = {"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _python_files(*packages):
    for package in packages:
        yield from sorted((REPO_ROOT / package).rglob("*.py"))


def test_no_shell_and_no_code_execution_from_parameters():
    import ast

    found = []
    for path in _python_files("emdask", "pipelines"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in SHELL_CALLS:
                    found.append(f"{path}:{node.lineno} {func.value.id}.{func.attr}")
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                found.append(f"{path}:{node.lineno} {func.id}")
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{path}:{node.lineno} shell=")
    assert not found, found


def test_model_files_are_never_unpickled():
    import ast

    found = []
    for path in _python_files("emdask"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            found += [f"{path}:{node.lineno} import {n}" for n in names if n in PICKLERS]
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    found.append(f"{path}:{node.value.lineno} allow_pickle")
    assert not found, found
