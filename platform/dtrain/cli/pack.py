"""`dtrain pack FOLDER`: a task of one's own as a Kubernetes job, as a kustomize overlay.

The folder holds the recipe, the task's module and small files beside them (a tokenizer, a
class list). They travel in a ConfigMap mounted at /etc/dtrain-task, on the job's PYTHONPATH, so
the recipe's `task: my_module:MyTask` imports there as it does here; the TrainJob runs on the
platform's `dtrain` runtime (k8s/cluster-training-runtime.yaml) with the image, nodes, ranks and
resources given here, and a NetworkPolicy admits only the job's own pods to them. The recipe is
validated here first, with the folder on the path: a bad key is one line now, not a failed pod.

    dtrain pack examples/tabular --name tabular --image registry.example.com/dtrain:cpu-0.1.0
    kubectl apply -k tabular-k8s/

A ConfigMap holds at most 1 MiB: data goes on the runs volume (`data.path=/runs/...`), not in
the folder. Files and folders whose name starts with "." or "_", and `runs/`, are left out.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from dtrain.errors import ConfigError

MOUNT = "/etc/dtrain-task"
LIMIT = 900 * 1024  # below a ConfigMap's 1 MiB, leaving room for its keys and metadata
SKIPPED = ("runs",)


def add(sub: Any) -> None:
    p = sub.add_parser("pack", help="a task folder of one's own as a Kubernetes job (a kustomize overlay)")
    p.add_argument("folder", help="the recipe, the task's module and small files beside them")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, passed to the job (EXTRA_ARGS)")
    p.add_argument("--recipe", default="recipe.yaml", help="the recipe, inside the folder (default recipe.yaml)")
    p.add_argument("--name", default="", help="the job's name (default: the folder's)")
    p.add_argument("--image", default="registry.example.com/dtrain:cuda-0.1.0", help="the training image")
    p.add_argument("--nodes", type=int, default=1, help="pods (default 1)")
    p.add_argument("--procs-per-node", type=int, default=1, help="ranks per pod (default 1)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per pod (nvidia.com/gpu; default 0)")
    p.add_argument("--cpu", default="4", help="CPU request per pod (default 4)")
    p.add_argument("--memory", default="16Gi", help="memory per pod, request and limit (default 16Gi)")
    p.add_argument("--output", default="", help="the overlay's folder (default NAME-k8s)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    name = args.name or re.sub(r"[^a-z0-9-]+", "-", folder.resolve().name.lower()).strip("-")
    if not re.fullmatch(r"[a-z]([a-z0-9-]{0,40}[a-z0-9])?", name):
        raise ConfigError("--name", name, "a Kubernetes name: lower-case letters, digits and '-', from a letter")
    for option in ("nodes", "procs_per_node"):
        if getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')}", getattr(args, option), "must be 1 or more")
    _validate(folder, args.recipe, args.overrides)
    files = _files(folder)
    out = Path(args.output or f"{name}-k8s")
    if (out / "task").exists():
        shutil.rmtree(out / "task")  # an earlier pack's copy: this one's files only
    # A copy inside the overlay: kustomize reads no file outside it, and the overlay ships alone.
    keys: dict[Path, str] = {}
    for path in files:
        relative = path.relative_to(folder)
        (out / "task" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / "task" / relative)
        keys[relative] = str(relative).replace("/", "__")
    (out / "trainjob.yaml").write_text(yaml.safe_dump_all(_job(args, name, keys), sort_keys=False))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "dtrain",
        "labels": [{"pairs": {"app.kubernetes.io/part-of": "dtrain"}}],
        "resources": ["trainjob.yaml"],
        # No hash suffix: the TrainJob (a custom resource) names the ConfigMap, and kustomize
        # rewrites such references only in the kinds it knows.
        "configMapGenerator": [
            {
                "name": f"{name}-task",
                "files": [f"{key}=task/{relative}" for relative, key in keys.items()],
                "options": {"disableNameSuffixHash": True},
            }
        ],
    }
    (out / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    size = sum(p.stat().st_size for p in files)
    print(f"packed {folder} ({len(files)} files, {size / 1024:.0f} KiB) into {out}/: kubectl apply -k {out}/")


def _validate(folder: Path, recipe: str, overrides: list[str]) -> None:
    """The recipe loads and validates with the folder on the path, as in the pod."""
    from dtrain.train.config import load_config, validate

    path = folder / recipe
    if not path.is_file():
        raise ConfigError("--recipe", recipe, f"not a file in {folder}")
    sys.path.insert(0, str(folder.resolve()))
    try:
        validate(load_config(str(path), overrides))
    finally:
        sys.path.remove(str(folder.resolve()))


def _files(folder: Path) -> list[Path]:
    """What travels: the folder's files, less hidden and private ones and run outputs; at most
    LIMIT bytes in all, else one line naming the biggest."""
    if not folder.is_dir():
        raise ConfigError("folder", str(folder), "not a folder")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith((".", "_")) or part in SKIPPED for part in p.relative_to(folder).parts)
    )
    size = sum(p.stat().st_size for p in files)
    if size > LIMIT:
        biggest = max(files, key=lambda p: p.stat().st_size)
        raise ConfigError(
            "folder",
            str(folder),
            f"{size / 2**20:.1f} MiB of files (the biggest {biggest.relative_to(folder)}, "
            f"{biggest.stat().st_size / 2**20:.1f} MiB); a ConfigMap holds at most 1 MiB: put data on the runs "
            "volume (data.path=/runs/...) and leave it out of the folder",
        )
    return files


def _job(args: argparse.Namespace, name: str, keys: dict[Path, str]) -> list[dict[str, Any]]:
    """The TrainJob on the `dtrain` runtime, its task mounted, and its pods' NetworkPolicy."""
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": args.cpu, "memory": args.memory},
        "limits": {"memory": args.memory},
    }
    if args.gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = args.gpus
    env = [
        {"name": "RECIPE", "value": f"{MOUNT}/{args.recipe}"},
        {"name": "PYTHONPATH", "value": MOUNT},
        {"name": "EXTRA_ARGS", "value": " ".join(args.overrides)},
    ]
    items = [{"key": key, "path": str(relative)} for relative, key in keys.items()]
    pod = {
        "containers": [{"name": "node", "volumeMounts": [{"name": "task", "mountPath": MOUNT, "readOnly": True}]}],
        "volumes": [{"name": "task", "configMap": {"name": f"{name}-task", "items": items}}],
    }
    patch = {"replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}
    job = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name},
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "dtrain"},
            "trainer": {
                "image": args.image,
                "numNodes": args.nodes,
                "numProcPerNode": args.procs_per_node,
                "resourcesPerNode": resources,
                "env": env,
            },
            "runtimePatches": [{"manager": "dtrain.io/pack", "trainingRuntimeSpec": {"template": {"spec": patch}}}],
        },
    }
    peers = {"matchLabels": {"jobset.sigs.k8s.io/jobset-name": name}}
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-peers"},
        "spec": {
            "podSelector": peers,
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": peers}]}],
            "egress": [{"to": [{"podSelector": peers}]}],
        },
    }
    return [job, policy]
