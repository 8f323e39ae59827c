#!/usr/bin/env python3
"""Checks rendered Kubernetes objects against the models the projects publish on PyPI.

    kubectl kustomize k8s/overlays/prod | .venv/bin/python k8s/validate/validate.py

Reads a YAML stream (or JSON) of objects on stdin. Each object whose apiVersion and kind a published
model covers (MODELS below: cloudcoil's models, generated from Istio's, the Prometheus Operator's and
Kubernetes' own CRDs and OpenAPI) is built into that model and dumped back (by alias, unset fields
excluded). Pydantic drops unknown fields without a word, so the dump is compared with what went in:
a field the model dropped (a misspelt one) or read as something else is an error naming its path, as
are the model's own errors (a wrong enum, a missing required field, a wrong type). For kinds no
package covers, the Kubernetes types embedded in them are checked the same way (EMBEDDED below); the
rest of those objects is left to the hand-written schemas in k8s/schemas.

Prints one line per object and exits 1 when any object has an error. With --json, prints instead a
JSON list, one entry per object: apiVersion, kind, name, the model (distribution and version, or
null when none covers the kind), what the model covered ("object" or the embedded paths), errors.

`make k8s-tools` installs the pinned models into .venv (see the Makefile).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import sys
from importlib import metadata
from typing import Any, Iterator

import pydantic
import yaml

# (apiVersion, kind) → (distribution on PyPI, module, class).
MODELS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("extensions.istio.io/v1alpha1", "WasmPlugin"): (
        "cloudcoil-models-istio",
        "cloudcoil.models.istio.extensions.v1alpha1",
        "WasmPlugin",
    ),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): (
        "cloudcoil-models-istio",
        "cloudcoil.models.istio.networking.v1alpha3",
        "EnvoyFilter",
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (
        "cloudcoil-models-prometheus-operator",
        "cloudcoil.models.prometheus_operator.v1",
        "PrometheusRule",
    ),
    ("v1", "ConfigMap"): (
        "cloudcoil-models-kubernetes",
        "cloudcoil.models.kubernetes.core.v1",
        "ConfigMap",
    ),
}

# Kinds no package covers, and the Kubernetes core types inside them: (path with [] for "every
# item", distribution, module, class). Envoy Gateway's EnvoyProxy embeds corev1 types verbatim.
_EG_DEPLOYMENT = "spec.provider.kubernetes.envoyDeployment"
_CORE = ("cloudcoil-models-kubernetes", "cloudcoil.models.kubernetes.core.v1")
EMBEDDED: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"): [
        (f"{_EG_DEPLOYMENT}.pod.volumes[]", *_CORE, "Volume"),
        (f"{_EG_DEPLOYMENT}.container.volumeMounts[]", *_CORE, "VolumeMount"),
        (f"{_EG_DEPLOYMENT}.container.env[]", *_CORE, "EnvVar"),
        (f"{_EG_DEPLOYMENT}.initContainers[]", *_CORE, "Container"),
    ],
}


def import_alone(name: str) -> Any:
    """Imports module `name` without running the `__init__` of the packages above it.

    cloudcoil's model packages import every API group they hold when they are imported (the
    Kubernetes one all of them), seconds of CPU each; only the module of each kind is needed.
    """
    if name in sys.modules:
        return sys.modules[name]
    parent = name.rpartition(".")[0]
    # `cloudcoil` and `cloudcoil.models` are namespace packages: nothing runs when they load.
    package = import_alone(parent) if parent.count(".") >= 2 else importlib.import_module(parent)
    spec = importlib.machinery.PathFinder.find_spec(name, package.__path__)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if spec.submodule_search_locations is None:
        spec.loader.exec_module(module)
    return module


def model_class(distribution: str, module: str, name: str) -> tuple[type[pydantic.BaseModel], str]:
    """The model class and "distribution version", or SystemExit saying what to install."""
    try:
        cls = getattr(import_alone(module), name)
        version = metadata.version(distribution)
    except (ImportError, AttributeError, metadata.PackageNotFoundError) as e:
        raise SystemExit(f"validate.py: {distribution} is not installed ({e}); run `make k8s-tools`")
    return cls, f"{distribution} {version}"


def differences(given: Any, dumped: Any, path: str) -> Iterator[str]:
    """What the model lost or changed on the way from `given` to `dumped`."""
    if isinstance(given, dict):
        if not isinstance(dumped, dict):
            yield f"{path}: an object, read by the model as {json.dumps(dumped)}"
            return
        for key, value in given.items():
            where = f"{path}.{key}" if path else key
            if key not in dumped:
                yield f"{where}: unknown field (the model has no such field and dropped it)"
            else:
                yield from differences(value, dumped[key], where)
        for key in dumped.keys() - given.keys():
            yield f"{path}.{key}: added by the model" if path else f"{key}: added by the model"
    elif isinstance(given, list):
        if not isinstance(dumped, list) or len(dumped) != len(given):
            yield f"{path}: a list of {len(given)}, read by the model as {json.dumps(dumped)}"
            return
        for i, (a, b) in enumerate(zip(given, dumped)):
            yield from differences(a, b, f"{path}[{i}]")
    elif not same_scalar(given, dumped):
        yield f"{path}: {json.dumps(given)} read by the model as {json.dumps(dumped)}"


def same_scalar(a: Any, b: Any) -> bool:
    # 1 and 1.0 are the same number in JSON; True and 1 are not the same value.
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, numbers) and isinstance(b, numbers):
        return a == b
    return type(a) is type(b) and a == b


def check(cls: type[pydantic.BaseModel], value: Any, path: str) -> list[str]:
    """Errors of `value` against `cls`: the model's own, then what it dropped or changed."""
    try:
        built = cls.model_validate(value)
    except pydantic.ValidationError as e:
        return [model_error(path, err) for err in e.errors()]
    dumped = built.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return [join(path, d) if path else d for d in differences(value, dumped, "")]


def model_error(path: str, err: Any) -> str:
    where = join(path, "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip("."))
    if err["type"] == "missing":
        return f"{where}: required field missing"
    return f"{where}: {err['msg']} (got {json.dumps(err.get('input'), default=str)[:100]})"


def join(prefix: str, rest: str) -> str:
    if not prefix:
        return rest
    if not rest:
        return prefix
    return f"{prefix}{rest}" if rest.startswith("[") else f"{prefix}.{rest}"


def at(doc: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(concrete path, value) for each place `path` names in `doc`; nothing where it is absent."""
    found: list[tuple[str, Any]] = [("", doc)]
    for part in path.split("."):
        every = part.endswith("[]")
        key = part.removesuffix("[]")
        step: list[tuple[str, Any]] = []
        for where, value in found:
            if not isinstance(value, dict) or key not in value:
                continue
            child, here = value[key], join(where, key)
            if every:
                if isinstance(child, list):
                    step.extend((f"{here}[{i}]", item) for i, item in enumerate(child))
            else:
                step.append((here, child))
        found = step
    return iter(found)


def validate(doc: Any) -> dict[str, Any]:
    key = (str(doc.get("apiVersion", "")), str(doc.get("kind", ""))) if isinstance(doc, dict) else ("", "")
    name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) else None
    report: dict[str, Any] = {"apiVersion": key[0], "kind": key[1], "name": name}
    if key in MODELS:
        cls, source = model_class(*MODELS[key])
        report.update(model=source, covers="object", errors=check(cls, doc, ""))
    elif key in EMBEDDED:
        errors: list[str] = []
        sources: set[str] = set()
        for path, *spec in EMBEDDED[key]:
            cls, source = model_class(*spec)
            sources.add(source)
            for where, value in at(doc, path):
                errors.extend(check(cls, value, where))
        report.update(
            model=", ".join(sorted(sources)),
            covers=[path for path, *_ in EMBEDDED[key]],
            errors=errors,
        )
    else:
        report.update(model=None, covers=None, errors=[])
    return report


def documents(text: str) -> list[Any]:
    docs: list[Any] = []
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, list):
            docs.extend(doc)
        elif doc is not None:
            docs.append(doc)
    return docs


def main(argv: list[str]) -> int:
    as_json = "--json" in argv[1:]
    reports = [validate(doc) for doc in documents(sys.stdin.read())]
    if as_json:
        print(json.dumps(reports, indent=1))
        return 0
    failed = False
    for r in reports:
        what = f"{r['kind']}/{r['name']}"
        if r["model"] is None:
            print(f"{what}: no published model (k8s/schemas covers it)")
            continue
        scope = "" if r["covers"] == "object" else f" ({', '.join(r['covers'])})"
        if r["errors"]:
            failed = True
            print(f"{what}: INVALID against {r['model']}{scope}")
            for e in r["errors"]:
                print(f"  {e}")
        else:
            print(f"{what}: valid against {r['model']}{scope}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
