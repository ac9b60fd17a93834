"""Render the kustomizations in ``deploy/`` without a kustomize binary.

Covers exactly the features ``deploy/`` uses, and refuses any other: ``resources`` (files
and directories), ``components``, ``namespace``, ``labels`` (pairs, on metadata),
``images`` and ``patches`` with a ``target`` and a JSON 6902 patch. Where ``kubectl`` is
installed, a test checks that this renders what ``kubectl kustomize`` renders.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "labels", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class KustomizeError(ValueError):
    pass


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization directory produces, in order."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources", []) + spec.get("components", []):
        path = directory / entry
        if path.is_dir():
            resources.extend(render(path))
        else:
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch in spec.get("patches", []):
        _patch(resources, patch, directory)
    for image in spec.get("images", []):
        for doc in resources:
            for container in _containers(doc):
                if container.get("image", "").split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for label in spec.get("labels", []):
        if set(label) != {"pairs"}:
            raise KustomizeError(f"{directory}: only labels with pairs (metadata labels) are supported")
        for doc in resources:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in spec:
        for doc in resources:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    return resources


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


def _patch(resources: list[dict[str, Any]], patch: dict[str, Any], directory: Path) -> None:
    target = patch["target"]
    ops = yaml.safe_load(patch["patch"])
    matches = [
        doc
        for doc in resources
        if doc["kind"] == target.get("kind", doc["kind"]) and doc["metadata"]["name"] == target.get("name")
    ]
    if not matches:
        raise KustomizeError(f"{directory}: patch target {target} matches nothing")
    for doc in matches:
        for op in ops:
            _apply_op(doc, op)


def _apply_op(doc: dict[str, Any], op: dict[str, Any]) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent: Any = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if op["op"] in ("add", "replace"):
        if op["op"] == "replace" and (last not in parent if isinstance(parent, dict) else int(last) >= len(parent)):
            raise KustomizeError(f"replace of a missing path {op['path']}")
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(index, value)
            else:
                parent[index] = value
        else:
            parent[last] = value
    elif op["op"] == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise KustomizeError(f"unsupported patch op {op['op']}")
