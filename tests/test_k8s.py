"""Kubernetes manifests, validated offline, and their commands run locally as 2 "pods".

Built-in kinds: kubernetes-validate --strict (the published OpenAPI schemas). PyTorchJob: the
Kubeflow training-operator CRD's openAPIV3Schema (release-1.9, tests/schemas/) with every
object closed, so a misspelt field fails, plus the operator's webhook rules.
"""

import copy
import json
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from helpers import ROOT, env_for_cli, free_port

K8S = ROOT / "k8s"
CRD = Path(__file__).parent / "schemas" / "kubeflow.org_pytorchjobs.yaml"
CUSTOM_KINDS = {"PyTorchJob", "Kustomization"}


def documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def closed(schema: dict) -> dict:
    """Forbid unknown properties on every object the schema describes, except where the CRD
    itself says unknown fields are kept (x-kubernetes-preserve-unknown-fields)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


def pytorchjob_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))


def webhook_errors(job: dict) -> list[str]:
    """The training operator's admission rules for PyTorchJob (what the CRD schema cannot say)."""
    errors = []
    specs = job["spec"]["pytorchReplicaSpecs"]
    for rtype, spec in specs.items():
        if rtype not in ("Master", "Worker"):
            errors.append(f"replica type {rtype} is neither Master nor Worker")
        names = [c["name"] for c in spec["template"]["spec"]["containers"]]
        if "pytorch" not in names:
            errors.append(f"{rtype}: no container named pytorch")
    if "Master" in specs and specs["Master"].get("replicas", 1) != 1:
        errors.append("Master replicas must be 1")
    elastic = job["spec"].get("elasticPolicy")
    if elastic and elastic.get("minReplicas", 1) > elastic.get("maxReplicas", 1):
        errors.append("elasticPolicy: minReplicas > maxReplicas")
    return errors


@pytest.mark.parametrize("name,doc", [d for d in documents() if d[1]["kind"] not in CUSTOM_KINDS],
                         ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_builtin_kinds_validate_strictly(name, doc):
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_pytorchjobs_validate_against_the_crd_and_webhook_rules():
    validator = pytorchjob_validator()
    jobs = [d for _, d in documents() if d["kind"] == "PyTorchJob"]
    assert len(jobs) == 2
    for job in jobs:
        errs = [e.message for e in validator.iter_errors(job)]
        assert not errs and not webhook_errors(job), (job["metadata"]["name"], errs, webhook_errors(job))


def test_validation_catches_mistakes():
    validator = pytorchjob_validator()
    job = next(d for _, d in documents() if d["kind"] == "PyTorchJob" and "elasticPolicy" not in d["spec"])
    typo = copy.deepcopy(job)
    typo["spec"]["pytorchReplicaSpecs"]["Worker"]["replica"] = 2  # replicas, misspelt
    assert any("replica" in e.message for e in validator.iter_errors(typo))
    deep = copy.deepcopy(job)
    deep["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert list(validator.iter_errors(deep))
    two_masters = copy.deepcopy(job)
    two_masters["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    assert webhook_errors(two_masters) == ["Master replicas must be 1"]
    renamed = copy.deepcopy(job)
    renamed["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "main"
    assert webhook_errors(renamed) == ["Worker: no container named pytorch"]
    bad_pod = next(d for _, d in documents() if d["kind"] == "Job")
    bad_pod = copy.deepcopy(bad_pod)
    bad_pod["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_pod, kubernetes_validate.latest_version(), strict=True)


def test_pods_run_non_root_with_shm_and_shared_runs_volume():
    for name, doc in documents():
        if doc["kind"] not in ("PyTorchJob", "Job", "Deployment"):
            continue
        pods = ([s["template"] for s in doc["spec"]["pytorchReplicaSpecs"].values()]
                if doc["kind"] == "PyTorchJob" else [doc["spec"]["template"]])
        for pod in pods:
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            for c in spec["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
                assert c["resources"]["requests"] and c["resources"]["limits"], name
            if doc["kind"] != "Deployment":
                vols = {v["name"]: v for v in spec["volumes"]}
                assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
                assert vols["runs"]["persistentVolumeClaim"]["claimName"] == "dtrain-runs"


def test_kustomization_lists_existing_files_and_recipe_is_in_sync():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).exists(), res
    cm = next(d for _, d in documents() if d["kind"] == "ConfigMap")
    assert cm["data"]["recipe.yaml"] == (ROOT / "recipes" / "transformer_charlm.yaml").read_text()


def _container(kind: str, name: str | None = None) -> dict:
    doc = next(d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))
    if kind == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    return doc["spec"]["template"]["spec"]["containers"][0]


def _run_pods(container: dict, pod_envs: list[dict], tmp_path: Path, **overrides: str) -> list[subprocess.CompletedProcess]:
    """Run the container's command as it is written, one process per 'pod', on loopback."""
    base = {e["name"]: e["value"] for e in container["env"]}
    procs = []
    for pod_env in pod_envs:
        env = env_for_cli(**{**base, **overrides, **pod_env})
        procs.append(subprocess.Popen(container["command"] + container["args"], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


FAST = "data.max_chars=100000 model.n_layer=1 model.n_embd=32 model.block_size=32 train.max_steps=6 " \
       "train.eval_every_steps=0 checkpoint.every_steps=0 tracking.enabled=false data.eval_blocks=8"


@pytest.fixture
def recipe_file(tmp_path):
    cm = next(d for _, d in documents() if d["kind"] == "ConfigMap")
    path = tmp_path / "recipe.yaml"
    path.write_text(cm["data"]["recipe.yaml"])
    return path


def test_indexed_job_command_for_two_pods(tmp_path, recipe_file):
    results = _run_pods(_container("Job"), [{"JOB_COMPLETION_INDEX": "0"}, {"JOB_COMPLETION_INDEX": "1"}], tmp_path,
                        RDZV_HOST="127.0.0.1", RDZV_PORT=str(free_port()), NPROC_PER_NODE="1",
                        RECIPE=str(recipe_file), OUTPUT_DIR=str(tmp_path / "out"), EXTRA_ARGS=FAST)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 6


def test_pytorchjob_command_with_the_operator_env(tmp_path, recipe_file):
    """The env training-operator 1.9 gives Master-0 and Worker-0 of a 2-pod job (nprocPerNode 1),
    with the Service name of the master replaced by loopback."""
    port = str(free_port())
    operator_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "PET_NNODES": "2",
                    "PET_NPROC_PER_NODE": "1", "PYTHONUNBUFFERED": "0"}
    pods = [{**operator_env, "RANK": "0", "PET_NODE_RANK": "0"}, {**operator_env, "RANK": "1", "PET_NODE_RANK": "1"}]
    results = _run_pods(_container("PyTorchJob", "dtrain-transformer"), pods, tmp_path,
                        RECIPE=str(recipe_file), OUTPUT_DIR=str(tmp_path / "out"), EXTRA_ARGS=FAST)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["world_size"] == 2
