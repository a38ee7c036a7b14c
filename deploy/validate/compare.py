#!/usr/bin/env python3
"""Compare two rendered manifest streams (kustomize build vs helm template) object by object.

Objects are matched by (apiVersion, kind, namespace, name). Before comparing, what only Helm
adds is removed: the labels helm.sh/chart and app.kubernetes.io/managed-by, and the pod
template's checksum/* annotations. Exit status 0 when both streams hold the same objects
with the same content, 1 otherwise (the differences are printed).

    compare.py KUSTOMIZE.yaml HELM.yaml [--ignore-kind Namespace]
"""

import argparse
import sys

import yaml

HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def load(path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    objs = {}
    for d in docs:
        meta = d.get("metadata", {})
        key = (d.get("apiVersion"), d.get("kind"), meta.get("namespace", ""), meta.get("name"))
        if key in objs:
            sys.exit(f"{path}: {key} appears twice")
        objs[key] = normalize(d)
    return objs


def drop_labels(meta):
    labels = meta.get("labels") or {}
    for k in HELM_ONLY_LABELS:
        labels.pop(k, None)
    if "labels" in meta and not labels:
        del meta["labels"]


def normalize(d):
    drop_labels(d.setdefault("metadata", {}))
    tmpl = (d.get("spec") or {}).get("template")
    if isinstance(tmpl, dict):
        tmeta = tmpl.setdefault("metadata", {})
        drop_labels(tmeta)
        ann = tmeta.get("annotations") or {}
        for k in [k for k in ann if k.startswith("checksum/")]:
            del ann[k]
    return d


def diff(a, b, path=""):
    """Yield human-readable differences between two parsed YAML values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}"
            if k not in a:
                yield f"{p}: only in helm: {b[k]!r}"
            elif k not in b:
                yield f"{p}: only in kustomize: {a[k]!r}"
            else:
                yield from diff(a[k], b[k], p)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{path}: {len(a)} items in kustomize, {len(b)} in helm"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from diff(x, y, f"{path}[{i}]")
    elif a != b:
        if isinstance(a, str) and isinstance(b, str) and "\n" in a + b:
            import difflib

            lines = difflib.unified_diff(
                a.splitlines(), b.splitlines(), "kustomize", "helm", lineterm=""
            )
            yield f"{path}: text differs\n    " + "\n    ".join(lines)
        else:
            yield f"{path}: kustomize {a!r} != helm {b!r}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kustomize")
    ap.add_argument("helm")
    ap.add_argument("--ignore-kind", action="append", default=[])
    args = ap.parse_args()

    k = {key: v for key, v in load(args.kustomize).items() if key[1] not in args.ignore_kind}
    h = {key: v for key, v in load(args.helm).items() if key[1] not in args.ignore_kind}
    name = lambda key: f"{key[1]}/{key[3]}" + (f" (ns {key[2]})" if key[2] else "")
    problems = []
    for key in sorted(set(k) | set(h), key=str):
        if key not in h:
            problems.append(f"{name(key)}: only in kustomize")
        elif key not in k:
            problems.append(f"{name(key)}: only in helm")
        else:
            problems += [f"{name(key)} {d}" for d in diff(k[key], h[key])]
    for p in problems:
        print(p)
    objs = ", ".join(name(key) for key in sorted(set(k) & set(h), key=str))
    if problems:
        print(f"compare: {len(problems)} difference(s)")
        return 1
    print(f"compare: {len(k)} objects identical after normalization: {objs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
