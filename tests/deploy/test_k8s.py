"""Kubernetes manifests, validated offline, and their commands run locally as 2 "pods".

Built-in kinds: kubernetes-validate --strict (the published OpenAPI schemas). PyTorchJob: the
Kubeflow training-operator CRD's openAPIV3Schema (release-1.9, tests/schemas/) with every
object closed, so a misspelt field fails, plus the operator's webhook rules. TrainJob and
ClusterTrainingRuntime (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1): their CRDs'
schemas, closed the same way, plus the CEL rules they state and the Torch plugin's checks.
"""

import copy
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers import ROOT, env_for_cli, free_port, load_params, max_param_diff, run_dtrain

K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parents[1] / "support" / "schemas"
CRD = SCHEMAS / "kubeflow.org_pytorchjobs.yaml"
CUSTOM_KINDS = {"PyTorchJob", "Kustomization", "TrainJob", "ClusterTrainingRuntime"}


class StrictLoader(yaml.SafeLoader):
    """YAML as Kubernetes should read it, not as it does: a key given twice in one mapping is an
    error (kubectl, PyYAML and kustomize all keep the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"keys given twice: {twice}", node.start_mark)
        return super().construct_mapping(node, deep)


def load_all(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=StrictLoader) if d]


def documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in load_all(p.read_text())]


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


def crd_validator(path: Path, version_name: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == version_name]
    return jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))


def pytorchjob_validator() -> jsonschema.Draft7Validator:
    return crd_validator(CRD, "v1")


def trainer_validators() -> dict[str, jsonschema.Draft7Validator]:
    return {
        "TrainJob": crd_validator(SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
        "ClusterTrainingRuntime": crd_validator(
            SCHEMAS / "trainer.kubeflow.org_clustertrainingruntimes.yaml", "v1alpha1"
        ),
    }


PET_RESERVED = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}


def trainer_rule_errors(doc: dict) -> list[str]:
    """What the Trainer v2 CRDs state as CEL rules (jsonschema cannot run them), for a create,
    and what its Torch plugin needs of a runtime: a replicated Job `node`, labelled as the
    trainer's ancestor step, with a container `node` (where PET_* are injected)."""
    errors = []
    name = doc["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not a DNS label")
    if doc["kind"] == "TrainJob":
        trainer = doc["spec"].get("trainer", {})
        if trainer.get("numProcPerNode", 1) < 1:
            errors.append("trainer.numProcPerNode must be >= 1")
        reserved = {e["name"] for e in trainer.get("env", [])} & PET_RESERVED
        if reserved:
            errors.append(f"trainer.env sets reserved {sorted(reserved)}")
    else:
        policies = [k for k in ("torch", "mpi", "jax", "xgboost", "flux") if k in doc["spec"]["mlPolicy"]]
        if policies != ["torch"]:
            errors.append(f"mlPolicy must be torch only, got {policies}")
        jobs = {j["name"]: j for j in doc["spec"]["template"]["spec"]["replicatedJobs"]}
        node = jobs.get("node")
        if (
            node is None
            or node["template"]["metadata"]["labels"].get("trainer.kubeflow.org/trainjob-ancestor-step") != "trainer"
        ):
            errors.append("no replicated Job `node` labelled trainjob-ancestor-step: trainer")
        elif "node" not in [c["name"] for c in node["template"]["spec"]["template"]["spec"]["containers"]]:
            errors.append("Job `node` has no container `node`")
    return errors


def runtime_pod(doc: dict) -> dict:
    (job,) = doc["spec"]["template"]["spec"]["replicatedJobs"]
    return job["template"]["spec"]["template"]


def pod_templates(docs: list[tuple[str, dict]] | None = None) -> dict[str, dict]:
    """Every pod template in the manifests, by `Kind/name/index`."""
    pods = {}
    for _, doc in documents() if docs is None else docs:
        templates = (
            [s["template"] for s in doc["spec"]["pytorchReplicaSpecs"].values()]
            if doc["kind"] == "PyTorchJob"
            else [runtime_pod(doc)]
            if doc["kind"] == "ClusterTrainingRuntime"
            else [doc["spec"]["template"]]
            if doc["kind"] in ("Job", "Deployment", "StatefulSet")
            else []
        )
        for i, t in enumerate(templates):
            pods[f"{doc['kind']}/{doc['metadata']['name']}/{i}"] = t
    return pods


TRAINING = ("PyTorchJob", "Job", "ClusterTrainingRuntime")


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


@pytest.mark.parametrize(
    "name,doc",
    [d for d in documents() if d[1]["kind"] not in CUSTOM_KINDS],
    ids=lambda x: x if isinstance(x, str) else x["kind"],
)
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
    for name, pod in pod_templates().items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec["containers"] + spec.get("initContainers", []):
            # The runtime's node container gets its resources from the TrainJob (resourcesPerNode).
            assert name.startswith("ClusterTrainingRuntime") or (
                c["resources"]["requests"] and c["resources"]["limits"]
            ), (name, c["name"])
        if name.startswith(TRAINING):
            vols = {v["name"]: v for v in spec["volumes"]}
            assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
            assert vols["runs"]["persistentVolumeClaim"]["claimName"] == "dtrain-runs"


def hardening_errors(name: str, pod: dict) -> list[str]:
    """What the namespace's Pod Security `restricted` level refuses, and more: a pod that holds a
    service-account token, a container that can write its own image's files."""
    spec, errors = pod["spec"], []
    if spec.get("automountServiceAccountToken") is not False:
        errors.append(f"{name}: mounts a service-account token")
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        errors.append(f"{name}: shares a host namespace")
    if any("hostPath" in v for v in spec.get("volumes", [])):
        errors.append(f"{name}: mounts a host path")
    if spec["securityContext"].get("seccompProfile", {}).get("type") != "RuntimeDefault":
        errors.append(f"{name}: no RuntimeDefault seccomp profile")
    for c in spec["containers"] + spec.get("initContainers", []):
        sc, where = c.get("securityContext", {}), f"{name}/{c['name']}"
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]:
            errors.append(f"{where}: may escalate or keeps capabilities")
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{where}: writable root file system")
        if any("hostPort" in port for port in c.get("ports", [])):
            errors.append(f"{where}: a host port")
    return errors


def test_pods_are_hardened_and_the_namespace_enforces_restricted():
    """Every pod: no service-account token, a read-only root file system (scratch on emptyDir),
    no privilege; the namespace refuses pods below Pod Security's `restricted` level."""
    pods = pod_templates()
    assert len(pods) == 7
    assert [e for name, pod in pods.items() for e in hardening_errors(name, pod)] == []
    (ns,) = [d for _, d in documents() if d["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod in pods.items():
        if name.startswith(TRAINING):  # caches and torchrun's files: writable, on emptyDir
            mounts = {m["mountPath"] for c in pod["spec"]["containers"] for m in c["volumeMounts"]}
            assert {"/tmp", "/home/dtrain", "/dev/shm"} <= mounts, name
    # What the checker catches: each guard lifted on a copy of one pod.
    pod = copy.deepcopy(pods["Job/dtrain-indexed/0"])
    del pod["spec"]["automountServiceAccountToken"]
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    pod["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(hardening_errors("pod", pod)) == 3


def test_every_manifest_parses_strictly():
    """A key given twice (k8s/kustomization.yaml once held two `secretGenerator`s and an
    `images:` whose value was a comment's tail; kubectl renders such a file without a word)."""
    for p in K8S.glob("*.yaml"):
        assert load_all(p.read_text()), p
    garbled = "secretGenerator:\n  - name: a\nimages: and the recipe first)\nsecretGenerator:\n  - name: a\n"
    assert yaml.safe_load(garbled)["images"] == "and the recipe first)"  # what a lenient reader makes of it
    with pytest.raises(yaml.constructor.ConstructorError, match="given twice"):
        load_all(garbled)


def test_kustomization_lists_existing_files_and_recipe_is_in_sync():
    (kust,) = load_all((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).exists(), res
    cm = next(d for _, d in documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "dtrain-recipe")
    assert cm["data"]["recipe.yaml"] == (ROOT / "recipes" / "transformer_charlm.yaml").read_text()


def _container(kind: str, name: str | None = None) -> dict:
    doc = next(d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))
    if kind == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    return doc["spec"]["template"]["spec"]["containers"][0]


def _run_pods(
    container: dict, pod_envs: list[dict], tmp_path: Path, **overrides: str
) -> list[subprocess.CompletedProcess]:
    """Run the container's command as it is written, one process per 'pod', on loopback."""
    base = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # pod_envs resolve the rest
    procs = []
    for pod_env in pod_envs:
        env = env_for_cli(**{**base, **overrides, **pod_env})
        procs.append(
            subprocess.Popen(
                container["command"] + container["args"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


FAST = (
    "data.max_chars=100000 model.n_layer=1 model.n_embd=32 model.block_size=32 train.max_steps=6 "
    "train.eval_every_steps=0 checkpoint.every_steps=0 tracking.enabled=false data.eval_blocks=8"
)


@pytest.fixture
def recipe_file(tmp_path):
    cm = next(d for _, d in documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "dtrain-recipe")
    path = tmp_path / "recipe.yaml"
    path.write_text(cm["data"]["recipe.yaml"])
    return path


@pytest.mark.slow
def test_indexed_job_command_for_two_pods(tmp_path, recipe_file):
    results = _run_pods(
        _container("Job"),
        [{"JOB_COMPLETION_INDEX": "0"}, {"JOB_COMPLETION_INDEX": "1"}],
        tmp_path,
        RDZV_HOST="127.0.0.1",
        RDZV_PORT=str(free_port()),
        NPROC_PER_NODE="1",
        RECIPE=str(recipe_file),
        OUTPUT_DIR=str(tmp_path / "out"),
        EXTRA_ARGS=FAST,
    )
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 6


@pytest.mark.slow
def test_pytorchjob_command_with_the_operator_env(tmp_path, recipe_file):
    """The env training-operator 1.9 gives Master-0 and Worker-0 of a 2-pod job (nprocPerNode 1),
    with the Service name of the master replaced by loopback."""
    port = str(free_port())
    operator_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "WORLD_SIZE": "2",
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PYTHONUNBUFFERED": "0",
    }
    pods = [{**operator_env, "RANK": "0", "PET_NODE_RANK": "0"}, {**operator_env, "RANK": "1", "PET_NODE_RANK": "1"}]
    results = _run_pods(
        _container("PyTorchJob", "dtrain-transformer"),
        pods,
        tmp_path,
        RECIPE=str(recipe_file),
        OUTPUT_DIR=str(tmp_path / "out"),
        EXTRA_ARGS=FAST,
    )
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["world_size"] == 2


# ------------------------------------------------------------------ Kubeflow Trainer v2


def test_trainer_v2_manifests_validate_against_the_crds_and_rules():
    validators = trainer_validators()
    docs = [d for _, d in documents() if d["kind"] in validators]
    assert sorted(d["kind"] for d in docs) == ["ClusterTrainingRuntime", "TrainJob"]
    for doc in docs:
        errs = [e.message for e in validators[doc["kind"]].iter_errors(doc)]
        assert not errs and not trainer_rule_errors(doc), (doc["kind"], errs, trainer_rule_errors(doc))
    job = next(d for d in docs if d["kind"] == "TrainJob")
    runtime = next(d for d in docs if d["kind"] == "ClusterTrainingRuntime")
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": runtime["metadata"]["name"],
    }


def test_trainer_v2_validation_catches_mistakes():
    validators = trainer_validators()
    job = next(d for _, d in documents() if d["kind"] == "TrainJob")
    runtime = next(d for _, d in documents() if d["kind"] == "ClusterTrainingRuntime")
    typo = copy.deepcopy(job)
    typo["spec"]["trainer"]["numNode"] = 2  # numNodes, misspelt
    assert any("numNode" in e.message for e in validators["TrainJob"].iter_errors(typo))
    as_string = copy.deepcopy(job)
    as_string["spec"]["trainer"]["numProcPerNode"] = "auto"  # an integer in this CRD version
    assert list(validators["TrainJob"].iter_errors(as_string))
    deep = copy.deepcopy(runtime)
    runtime_pod(deep)["spec"]["containers"][0]["volumeMount"] = []  # volumeMounts, misspelt, five levels down
    assert list(validators["ClusterTrainingRuntime"].iter_errors(deep))
    jobset = copy.deepcopy(runtime)
    jobset["spec"]["template"]["spec"]["failurePolicy"]["maxRestart"] = 3
    assert list(validators["ClusterTrainingRuntime"].iter_errors(jobset))
    reserved = copy.deepcopy(job)
    reserved["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "4"})
    assert trainer_rule_errors(reserved) == ["trainer.env sets reserved ['PET_NNODES']"]
    renamed = copy.deepcopy(runtime)
    runtime_pod(renamed)["spec"]["containers"][0]["name"] = "pytorch"  # the PyTorchJob's name: no PET_* here
    assert trainer_rule_errors(renamed) == ["Job `node` has no container `node`"]
    two = copy.deepcopy(runtime)
    two["spec"]["mlPolicy"]["mpi"] = {}
    assert trainer_rule_errors(two) == ["mlPolicy must be torch only, got ['torch', 'mpi']"]


def test_trainjob_pods_match_the_pytorchjob_pods():
    """Moving from PyTorchJob to TrainJob changes the operator, not the pods."""
    runtime = runtime_pod(next(d for _, d in documents() if d["kind"] == "ClusterTrainingRuntime"))["spec"]
    master = next(d for _, d in documents() if d["kind"] == "PyTorchJob" and "elasticPolicy" not in d["spec"])
    pod = master["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert runtime["securityContext"] == pod["securityContext"] and runtime["volumes"] == pod["volumes"]
    rc, pc = runtime["containers"][0], pod["containers"][0]
    assert rc["securityContext"] == pc["securityContext"] and rc["volumeMounts"] == pc["volumeMounts"]
    assert {e["name"] for e in pc["env"]} <= {e["name"] for e in rc["env"]}
    assert "resume=auto" in rc["args"][0] and "$EXTRA_ARGS" in rc["args"][0]


def checkpoint_params(folder: Path) -> dict:
    import torch

    return torch.load(folder / "model" / "state.pt", weights_only=True)["model"]


def _trainjob_pod_envs(tmp_path: Path, nodes: int, nproc: int, **job_env: str) -> tuple[dict, list[dict]]:
    """The `node` container and, per pod, the env the Trainer v2 operator and kubelet give it:
    the runtime's env, the TrainJob's trainer.env upserted over it, the Torch plugin's PET_*
    (the master's DNS name replaced by loopback), fieldRefs resolved, $(VAR) expanded, and
    each volume's mountPath replaced by a local directory."""
    runtime = next(d for _, d in documents() if d["kind"] == "ClusterTrainingRuntime")
    job = next(d for _, d in documents() if d["kind"] == "TrainJob")
    container = runtime_pod(runtime)["spec"]["containers"][0]
    mounts = {"/runs": tmp_path / "runs", "/etc/dtrain": tmp_path}
    env = {e["name"]: e for e in container["env"]}
    env.update({e["name"]: e for e in job["spec"]["trainer"]["env"]})
    env.update({k: {"name": k, "value": v} for k, v in job_env.items()})
    port = str(free_port())
    pods = []
    for node_rank in range(nodes):
        resolved = {
            "PET_NNODES": str(nodes),
            "PET_NPROC_PER_NODE": str(nproc),
            "PET_NODE_RANK": str(node_rank),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": port,
        }
        for name, e in env.items():
            if "valueFrom" in e:
                assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['jobset.sigs.k8s.io/jobset-name']"
                value = job["metadata"]["name"]
            else:
                value = re.sub(r"\$\((\w+)\)", lambda m, known=resolved: known[m.group(1)], e["value"])
            for path, local in mounts.items():
                if value.startswith(path + "/"):
                    value = str(local) + value[len(path) :]
            resolved[name] = value
        pods.append(resolved)
    return container, pods


@pytest.mark.slow
def test_trainjob_command_on_two_pods_matches_one_node(tmp_path, recipe_file):
    """2 nodes x 1 rank, as the TrainJob runs it, trains to the parameters of 1 node x 2 ranks."""
    reference, two_pods = tmp_path / "one-node", tmp_path / "two-pods"
    for where, nodes, nproc in ((reference, 1, 2), (two_pods, 2, 1)):
        where.mkdir()
        (where / "recipe.yaml").write_text(recipe_file.read_text())
        container, pods = _trainjob_pod_envs(where, nodes, nproc, EXTRA_ARGS=FAST + " checkpoint.every_steps=5")
        results = _run_pods(container, pods, where)
        for r in results:
            assert r.returncode == 0, r.stderr[-3000:]
    out = "runs/dtrain-transformer"  # OUTPUT_DIR: /runs/$(TRAINJOB_NAME)
    s = json.loads((two_pods / out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 6
    final = load_params(two_pods / out / "model.pt")
    assert max_param_diff(final, load_params(reference / out / "model.pt")) < 1e-6
    # What the bound would catch: one step less (the step-5 checkpoint) is far outside it.
    step5 = checkpoint_params(reference / out / "checkpoints" / "step_00000005")
    assert max_param_diff(final, step5) > 1e-4


# ------------------------------------------------------------------ credentials and network policies


def test_no_secret_value_is_in_the_manifests():
    """A Secret in the kustomization (it held `change-me`) reset a rotated secret on every
    `kubectl apply -k`; the Secrets are generated from git-ignored files instead."""
    assert not [name for name, d in documents() if d["kind"] == "Secret"]
    assert not [p.name for p in K8S.glob("*.yaml") if "change-me" in p.read_text()]
    (kust,) = load_all((K8S / "kustomization.yaml").read_text())
    for gen in kust["secretGenerator"]:
        for env_file in gen["envs"]:
            ignored = subprocess.run(["git", "check-ignore", "-q", str(K8S / env_file)], cwd=ROOT)
            assert ignored.returncode == 0, f"{env_file} would be committed"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`kubectl kustomize` of a copy of k8s/ with secrets from make-secrets.sh (offline)."""
    import shutil

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the kustomization was not built")
    tmp = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tmp, ignore=shutil.ignore_patterns("secrets"))
    subprocess.run(["bash", str(tmp / "make-secrets.sh")], check=True, capture_output=True)
    out = subprocess.run(["kubectl", "kustomize", str(tmp)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return tmp, load_all(out.stdout)


def test_the_kustomization_builds_with_generated_secrets_every_reference_resolves(built):
    tmp, docs = built
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert "mlflow-auth" in secrets and any(n.startswith("mlflow-db-") for n in secrets)
    refs = re.findall(r"name: (mlflow-(?:db|auth)\S*)", yaml.safe_dump_all(docs))
    assert refs and set(refs) <= set(secrets), (set(refs), set(secrets))
    for d in docs:
        if d["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
    values = [line.split("=", 1)[1] for f in (tmp / "secrets").glob("*.env") for line in f.read_text().splitlines()]
    assert not [p for p in K8S.rglob("*") if p.is_file() and any(v in p.read_text() for v in values if len(v) > 20)]


JOBSET = "jobset.sigs.k8s.io/jobset-name"
"""The label JobSet gives each pod of a TrainJob (the TrainJob's name)."""


def _pods_by_labels() -> dict[str, dict]:
    pods = {name: dict(t.get("metadata", {}).get("labels", {})) for name, t in pod_templates().items()}
    trainjob = next(d for _, d in documents() if d["kind"] == "TrainJob")
    pods["ClusterTrainingRuntime/dtrain/0"][JOBSET] = trainjob["metadata"]["name"]  # as JobSet labels them
    return pods


def _job(labels: dict) -> tuple[str, str] | None:
    """The label that names a pod's job, and its value."""
    return next(((k, labels[k]) for k in ("dtrain.io/job", JOBSET) if k in labels), None)


OUTSIDE = {"dns": {"k8s-app": "kube-dns"}, "internet": None}
"""Endpoints beyond the namespace's pods: the cluster's DNS (in kube-system), everything else."""


def _peers(rule_peers: list[dict] | None, pods: dict[str, dict]) -> set[str]:
    """The endpoints a rule's `from` / `to` list names (none given: every endpoint)."""
    if rule_peers is None:
        return {*pods, *OUTSIDE}
    found = set()
    for peer in rule_peers:
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        if "namespaceSelector" in peer:  # another namespace: here only kube-system's DNS is named
            found |= {e for e, el in OUTSIDE.items() if el and all(el.get(k) == v for k, v in labels.items())}
        elif "ipBlock" in peer:
            found.add("internet")
        else:
            found |= {p for p, pl in pods.items() if all(pl.get(k) == v for k, v in labels.items())}
    return found


def reachable(policies: list[dict], pods: dict[str, dict]) -> set[tuple[str, str]]:
    """(source, destination) pairs Kubernetes lets connect under `policies`: a destination that a
    policy selects for Ingress takes only what one of their rules admits, and a source selected
    for Egress sends only where one of their rules allows (ports aside)."""

    def allowed(direction: str, endpoint: str) -> set[str] | None:
        selecting = [
            p
            for p in policies
            if direction.capitalize() in p["spec"]["policyTypes"]
            and endpoint in _peers([{"podSelector": p["spec"]["podSelector"]}], pods)
        ]
        if not selecting:
            return None  # not isolated
        key = "from" if direction == "ingress" else "to"
        return {e for p in selecting for rule in p["spec"].get(direction, []) for e in _peers(rule.get(key), pods)}

    endpoints = [*pods, *OUTSIDE]
    pairs = set()
    for src in endpoints:
        out = allowed("egress", src)
        for dst in endpoints:
            into = allowed("ingress", dst)
            if src == dst or not {src, dst} & pods.keys():  # (between two outside endpoints: no policy here applies)
                continue
            if (out is None or dst in out) and (into is None or src in into):
                pairs.add((src, dst))
    return pairs


def test_the_namespace_denies_by_default_and_allows_only_the_jobs_paths():
    """A job's pods reach each other (only those of the same job) and MLflow, MLflow reaches
    PostgreSQL, every pod the DNS; nothing else: no pod reaches the internet, nothing outside
    reaches a pod."""
    pods = _pods_by_labels()
    policies = [d for _, d in documents() if d["kind"] == "NetworkPolicy"]
    training = {p for p in pods if p.startswith(TRAINING)}
    mlflow, postgres = "Deployment/mlflow/0", "StatefulSet/mlflow-postgres/0"
    assert len(training) == 5 and all(_job(pods[t]) for t in training)
    peers = {(a, b) for a in training for b in training if a != b and _job(pods[a]) == _job(pods[b])}
    assert peers == {("PyTorchJob/dtrain-transformer/0", "PyTorchJob/dtrain-transformer/1"),
                     ("PyTorchJob/dtrain-transformer/1", "PyTorchJob/dtrain-transformer/0")}  # fmt: skip
    expected = peers | {(t, mlflow) for t in training} | {(mlflow, postgres)} | {(p, "dns") for p in pods}
    assert reachable(policies, pods) == expected

    # A second pod of the Indexed Job reaches the first (its rendezvous); a pod of another job
    # in the namespace, even one whose own policies let it send anywhere, does not.
    def policy(name: str, job: str, direction: str) -> dict:
        rule = {"from" if direction == "Ingress" else "to": [{"podSelector": {}}]}
        return {"kind": "NetworkPolicy", "metadata": {"name": name},
                "spec": {"podSelector": {"matchLabels": {"dtrain.io/job": job}}, "policyTypes": [direction],
                         direction.lower(): [rule]}}  # fmt: skip

    indexed = pods["Job/dtrain-indexed/0"]
    more = {**pods, "Job/dtrain-indexed/1": indexed, "Job/other/0": {**indexed, "dtrain.io/job": "other"}}
    sends_anywhere = policy("other-egress", "other", "Egress")
    paths = reachable([*policies, sends_anywhere], more)
    assert ("Job/dtrain-indexed/1", "Job/dtrain-indexed/0") in paths
    assert ("Job/other/0", "Job/dtrain-indexed/0") not in paths
    # What the job's own policy does: with one letting any pod of the namespace in (as when all
    # training pods shared one policy), the other job's pod reaches the rendezvous.
    lifted = [*policies, sends_anywhere, policy("open", "dtrain-indexed", "Ingress")]
    assert ("Job/other/0", "Job/dtrain-indexed/0") in reachable(lifted, more)
    # What the label does: a training pod without it is not let in.
    assert ("Job/dtrain-indexed/0", mlflow) not in reachable(policies, {**pods, "Job/dtrain-indexed/0": {}})
    # What default-deny does: a pod no other policy names (one added later) is closed to the outside.
    more = {**pods, "Deployment/notebook/0": {}}
    assert ("internet", "Deployment/notebook/0") not in reachable(policies, more)
    lenient = [p for p in policies if p["metadata"]["name"] != "default-deny"]
    assert ("internet", "Deployment/notebook/0") in reachable(lenient, more)


def test_training_pods_hold_the_job_user_never_the_admin(built):
    """The pods get the `mlflow-auth` Secret (the jobs' own MLflow user); the admin's Secret is
    read by the MLflow server alone, and make-secrets.sh never names the job user `admin`."""
    tmp, docs = built
    for name, pod in pod_templates([("", d) for d in docs]).items():
        refs = set(re.findall(r"name: (mlflow-(?:admin|auth)\S*)", yaml.safe_dump(pod)))
        assert "mlflow-admin" not in str(refs) or name == "Deployment/mlflow/0", (name, refs)
        if name.startswith(TRAINING):
            assert refs == {"mlflow-auth"}, (name, refs)
    auth = dict(line.split("=", 1) for line in (tmp / "secrets" / "mlflow-auth.env").read_text().splitlines())
    admin = dict(line.split("=", 1) for line in (tmp / "secrets" / "mlflow-admin.env").read_text().splitlines())
    assert auth["MLFLOW_TRACKING_USERNAME"] != admin["MLFLOW_ADMIN_USERNAME"] == "admin"
    assert auth["MLFLOW_TRACKING_PASSWORD"] != admin["MLFLOW_ADMIN_PASSWORD"]


def test_make_secrets_moves_an_admin_the_pods_held_to_the_server(tmp_path):
    """An older layout gave the pods the admin (mlflow-auth.env): its live password stays the
    admin's, in mlflow-admin.env, and the pods get a user of their own."""
    (tmp_path / "mlflow-auth.env").write_text("MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=live-pw-1\n")
    subprocess.run(["bash", str(K8S / "make-secrets.sh"), str(tmp_path)], check=True, capture_output=True)
    assert (
        tmp_path / "mlflow-admin.env"
    ).read_text() == "MLFLOW_ADMIN_USERNAME=admin\nMLFLOW_ADMIN_PASSWORD=live-pw-1\n"
    assert "MLFLOW_TRACKING_USERNAME=dtrain-jobs" in (tmp_path / "mlflow-auth.env").read_text()
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.glob("*.env")} == {"0o600"}


def test_the_database_init_script_makes_mlflow_a_plain_owner(postgres, monkeypatch):
    """The script the PostgreSQL pod runs on its first start, run on a real server: `mlflow`
    owns its two databases and is no superuser (the image made POSTGRES_USER one). Then the
    MLflow pod's schema step (docker/mlflow_job_user.py) makes the jobs' user, no admin, and
    refuses to turn the admin into it."""
    import psycopg

    cm = next(d for _, d in documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-postgres-init")
    script = cm["data"]["10-mlflow-role.sh"]
    sql = script.split("<<'SQL'\n", 1)[1].rsplit("SQL", 1)[0]
    port = postgres.rsplit(":", 1)[1].split("/")[0]
    with psycopg.connect(postgres.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        for stmt in (
            "DROP DATABASE IF EXISTS mlflow",
            "DROP DATABASE IF EXISTS mlflow_auth",
            "DROP ROLE IF EXISTS mlflow",
        ):
            conn.execute(stmt)
    proc = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1"],
        input=sql,
        env={**env_for_cli(), "MLFLOW_DB_PASSWORD": "pw-from-env"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(postgres.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        role = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolpassword IS NOT NULL FROM pg_authid "
            "WHERE rolname = 'mlflow'"
        ).fetchone()
        owners = conn.execute(
            "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE 'mlflow%' ORDER BY datname"
        ).fetchall()
        stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'mlflow'").fetchone()[0]
    assert role == (False, False, False, True) and owners == [("mlflow", "mlflow"), ("mlflow_auth", "mlflow")]
    assert stored.startswith("SCRAM-SHA-256$")  # the password from the environment, stored hashed

    # The schema step then makes the jobs' MLflow user in `mlflow_auth`, as the `mlflow` role.
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    auth_uri = f"postgresql+psycopg://mlflow:pw-from-env@127.0.0.1:{port}/mlflow_auth"
    monkeypatch.setenv("MLFLOW_AUTH_DATABASE_URI", auth_uri)
    monkeypatch.setenv("MLFLOW_JOB_USERNAME", "dtrain-jobs")
    for password in ("job-password-1", "job-password-2"):  # a restart with a rotated Secret sets the new one
        monkeypatch.setenv("MLFLOW_JOB_PASSWORD", password)
        runpy.run_path(str(ROOT / "docker" / "mlflow_job_user.py"), run_name="__main__")
    store = SqlAlchemyStore()
    store.init_db(auth_uri)
    assert store.authenticate_user("dtrain-jobs", "job-password-2") and not store.get_user("dtrain-jobs").is_admin
    store.create_user("admin", "admin-password-1", is_admin=True)
    monkeypatch.setenv("MLFLOW_JOB_USERNAME", "admin")
    with pytest.raises(SystemExit, match="is an admin"):
        runpy.run_path(str(ROOT / "docker" / "mlflow_job_user.py"), run_name="__main__")
    assert store.get_user("admin").is_admin


def test_a_task_folder_of_ones_own_packs_into_an_overlay_that_builds_validates_and_loads(tmp_path):
    """`dtrain pack examples/tabular`: `kubectl kustomize` builds the overlay; the TrainJob
    validates against the Trainer v2 CRD (closed: a misspelt field fails) on the `dtrain`
    runtime, mounts the folder's ConfigMap where the runtime's pods have a container `node` in a
    Job `node`; and the ConfigMap's files, laid out as the volume's items say, are a folder in
    which the recipe (and its own task module) loads and validates, as in the pod."""
    from dtrain.train.config import load_config, validate

    out = tmp_path / "overlay"
    image = "registry.example.com/dtrain:cpu"
    args = ["pack", str(ROOT / "examples" / "tabular"), "--name", "tabular", "--image", image,
            "--nodes", "2", "--procs-per-node", "2", "--output", str(out), "train.epochs=2"]  # fmt: skip
    proc = run_dtrain(args, cwd=tmp_path)
    assert proc.returncode == 0 and f"into {out}/: kubectl apply -k {out}/" in proc.stdout, proc.stderr
    built = subprocess.run(["kubectl", "kustomize", str(out)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    docs = {d["kind"]: d for d in load_all(built.stdout)}
    assert sorted(docs) == ["ConfigMap", "NetworkPolicy", "TrainJob"]
    assert {d["metadata"]["namespace"] for d in docs.values()} == {"dtrain"}
    job, config_map = docs["TrainJob"], docs["ConfigMap"]
    validator = trainer_validators()["TrainJob"]
    errors = [e.message for e in validator.iter_errors(job)]
    assert not errors and not trainer_rule_errors(job), errors
    typo = copy.deepcopy(job)  # what the validation guards against: a field misspelt deep in the patch
    typo["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["templat"] = {}
    assert any("templat" in e.message for e in validator.iter_errors(typo))
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (
        2,
        2,
        "registry.example.com/dtrain:cpu",
    )
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env == {
        "RECIPE": "/etc/dtrain-task/recipe.yaml",
        "PYTHONPATH": "/etc/dtrain-task",
        "EXTRA_ARGS": "train.epochs=2",
    }
    runtime = next(d for _, d in documents() if d["kind"] == "ClusterTrainingRuntime")
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    (patch,) = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = patch["template"]["spec"]["template"]["spec"]
    assert patch["name"] == runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["name"]
    assert pod["containers"][0]["name"] in {c["name"] for c in runtime_pod(runtime)["spec"]["containers"]}
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert pod["containers"][0]["volumeMounts"] == [
        {"name": volume["name"], "mountPath": "/etc/dtrain-task", "readOnly": True}
    ]
    assert docs["NetworkPolicy"]["spec"]["podSelector"] == {
        "matchLabels": {"jobset.sigs.k8s.io/jobset-name": "tabular"}
    }
    # The pod's view of the task folder.
    mounted = tmp_path / "etc" / "dtrain-task"
    for item in volume["configMap"]["items"]:
        (mounted / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (mounted / item["path"]).write_text(config_map["data"][item["key"]])
    assert sorted(p.name for p in mounted.iterdir()) == ["recipe.yaml", "tabular_task.py"]
    sys.path.insert(0, str(mounted))
    try:
        cfg = load_config(str(mounted / "recipe.yaml"), env["EXTRA_ARGS"].split())
        validate(cfg)
    finally:
        sys.path.remove(str(mounted))
    assert cfg.train.epochs == 2 and cfg.model.hidden == 64  # the task's own config (its module imported)


def test_pack_refuses_in_one_line_what_would_fail_in_the_pod(tmp_path):
    folder = tmp_path / "task"
    shutil.copytree(ROOT / "examples" / "tabular", folder)
    bad = run_dtrain(["pack", str(folder), "--output", str(tmp_path / "o"), "optim.lr=fast"], cwd=tmp_path)
    assert bad.returncode == 2 and "optim.lr" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "o").exists()  # nothing written
    (folder / "table.csv").write_bytes(b"0" * 2_000_000)
    big = run_dtrain(["pack", str(folder), "--output", str(tmp_path / "o")], cwd=tmp_path)
    assert big.returncode == 2 and "the biggest table.csv, 1.9 MiB" in big.stderr and "runs volume" in big.stderr
    assert len(big.stderr.strip().splitlines()) == 1, big.stderr
