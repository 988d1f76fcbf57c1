"""Serve the scheduled deployments of ``deploy/prefect.yaml`` from one process.

``prefect deploy`` reads the same file to register the deployments on a work pool; serving
runs them, on their cron schedules or when triggered, without a pool or worker.

Only the emdask flows can be named as entrypoints, by module path
(``pipelines.impute:impute_survey``) or file path (``pipelines/impute.py:impute_survey``); a
configuration file never makes this process import other code. A parameter value may name an environment variable as
``"{{ $NAME }}"``, as ``prefect deploy`` allows.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_CONFIG", "FLOWS", "DeploymentSpec", "load_config", "serve", "to_deployments"]

#: The deployment file shipped with the project (in a checkout, or the working directory).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "prefect.yaml"


def default_config():
    """``deploy/prefect.yaml`` of the working directory if there is one, else of the project."""
    local = Path.cwd() / "deploy" / "prefect.yaml"
    return local if local.is_file() else DEFAULT_CONFIG

#: Entrypoints a configuration may name (module paths), and where their flows live.
FLOWS = {
    "pipelines.impute:impute_survey": ("pipelines.impute", "impute_survey"),
    "pipelines.segment:segment_customers": ("pipelines.segment", "segment_customers"),
    "pipelines.image:segment_image": ("pipelines.image", "segment_image"),
}
#: The same flows named by file path, as ``prefect init`` writes them.
_FILE_ENTRYPOINTS = {
    f"{module.replace('.', '/')}.py:{name}": key for key, (module, name) in FLOWS.items()
}

_ENV = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class ConfigError(ValueError):
    """A deployment file that cannot be served; the message names the file and the problem."""


@dataclass
class DeploymentSpec:
    """One deployment of the configuration file."""

    name: str
    entrypoint: str
    parameters: dict = field(default_factory=dict)
    schedules: list = field(default_factory=list)  # (cron, timezone) pairs
    description: str | None = None
    tags: list = field(default_factory=list)

    def flow(self):
        module, name = FLOWS[self.entrypoint]
        return getattr(importlib.import_module(module), name)


def _expand(value, where):
    if isinstance(value, str):
        def repl(m):
            if m.group(1) not in os.environ:
                raise ConfigError(f"{where}: environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]
        return _ENV.sub(repl, value)
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, where) for k, v in value.items()}
    return value


def load_config(path=None):
    """The deployments of a ``prefect.yaml`` file, checked.

    Returns
    -------
    list of DeploymentSpec
    """
    import yaml

    path = Path(path) if path is not None else default_config()
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deployment file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"deployment file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    deployments = (document or {}).get("deployments") or []
    if not deployments:
        raise ConfigError(f"deployment file {path} defines no deployments")
    specs = []
    for i, d in enumerate(deployments):
        name = d.get("name")
        where = f"{path}: deployment {name or i}"
        if not name:
            raise ConfigError(f"{where} has no name")
        entry = _FILE_ENTRYPOINTS.get(d.get("entrypoint"), d.get("entrypoint"))
        if entry not in FLOWS:
            raise ConfigError(f"{where}: entrypoint {entry!r} is not one of {sorted(FLOWS)}")
        schedules = []
        for s in d.get("schedules") or []:
            if "cron" not in s:
                raise ConfigError(f"{where}: every schedule needs a cron string")
            schedules.append((str(s["cron"]), s.get("timezone")))
        specs.append(DeploymentSpec(
            name=name,
            entrypoint=entry,
            parameters=_expand(dict(d.get("parameters") or {}), where),
            schedules=schedules,
            description=d.get("description"),
            tags=list(d.get("tags") or []),
        ))
    return specs


def to_deployments(specs):
    """Prefect runner deployments (``flow.to_deployment``) of the specs, schedules included."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    # flows load by module path, so Dask workers find every function by its package path
    return [
        spec.flow().to_deployment(
            name=spec.name,
            entrypoint_type=EntrypointType.MODULE_PATH,
            schedules=[Cron(cron, timezone=tz) for cron, tz in spec.schedules] or None,
            parameters=spec.parameters,
            description=spec.description,
            tags=spec.tags,
        )
        for spec in specs
    ]


def serve(config=None, only=None, limit=None):
    """Serve the configuration's deployments (or those named in ``only``) until interrupted."""
    from prefect import serve as prefect_serve

    specs = load_config(config)
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise ConfigError(f"no deployment named {unknown}; the file defines {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in set(only)]
    prefect_serve(*to_deployments(specs), limit=limit)
