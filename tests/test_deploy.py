"""The deployment recipes in deploy/ (a GKE JobSet queued by Kueue, a SkyPilot task), checked without a cluster or a
cloud account.

Always, from the locked environment: every YAML parses into objects of known kinds; the command a TPU host runs is one
`octft sweep launch` that octft's own parser and launch checks accept (the sweep file exists, every override is a key
of its base experiment); the worker's environment names only variables octft reads; store URLs come from Secrets and
the example Secrets hold no password; the stores are the Services the manifests run, in two databases; Kueue can
admit what the JobSet asks for. With tools the lock does not install (skipped without them): Kubernetes' own schemas
for the built-in kinds and the JobSet's Job template (`kubernetes-validate`), SkyPilot's own task parser
(`skypilot`). Neither checks a JobSet or Kueue object against its CRD; deploy/README.md says how that was done.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from octft.cli import build_parser, cmd_sweep_launch
from octft.stores import check_not_shared
from octft.sweep.plan import load_launch_spec
from octft.train.devices import TPU_CHIP_BOUNDS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
GKE = DEPLOY / "gke"
SKYPILOT_TASK = DEPLOY / "skypilot" / "octft-sweep.yaml"
YAMLS = sorted(DEPLOY.rglob("*.yaml"))
PLACEHOLDER = "CHANGE_ME"

# (apiVersion, kind) -> namespaced
KINDS = {
    ("v1", "Namespace"): False,
    ("v1", "Secret"): True,
    ("v1", "ConfigMap"): True,
    ("v1", "Service"): True,
    ("v1", "ServiceAccount"): True,
    ("apps/v1", "Deployment"): True,
    ("apps/v1", "StatefulSet"): True,
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): True,
    ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): False,
    ("kueue.x-k8s.io/v1beta2", "ClusterQueue"): False,
    ("kueue.x-k8s.io/v1beta2", "LocalQueue"): True,
}
# Variables that hold a credential or a URL that may carry one: never a literal value in a manifest.
SECRET_VARIABLES = {"OCTFT_OPTUNA_STORAGE", "MLFLOW_BACKEND_STORE_URI", "B2_APPLICATION_KEY_ID", "B2_APPLICATION_KEY",
                    "POSTGRES_PASSWORD"}
# A variable with one of these prefixes given to octft must be one octft reads (a typo would be silently ignored).
OCTFT_PREFIXES = ("OCTFT_", "MLFLOW_", "B2_", "PJRT_", "TPU_", "XLA_")


@functools.cache
def kubernetes_objects() -> list[dict]:
    """Every object of deploy/gke/ (read once; the tests only read them)."""
    return [doc for path in sorted(GKE.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str) -> dict:
    found = [obj for obj in kubernetes_objects() if obj["kind"] == kind]
    assert len(found) == 1, f"deploy/gke/ should hold one {kind}, holds {len(found)}"
    return found[0]


def by_name(kind: str, name: str) -> dict:
    found = [obj for obj in kubernetes_objects() if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert found, f"deploy/gke/ has no {kind} named {name!r}"
    return found[0]


def jobset_job() -> dict:
    (replicated,) = one("JobSet")["spec"]["replicatedJobs"]
    return replicated


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "JobSet":
        return jobset_job()["template"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def container(obj: dict, name: str) -> dict:
    return next(item for item in pod_spec(obj)["containers"] if item["name"] == name)


@functools.cache
def skypilot_task() -> dict:
    return yaml.safe_load(SKYPILOT_TASK.read_text())


@functools.cache
def example_secret_values() -> dict[tuple[str, str], str]:
    return {(obj["metadata"]["name"], key): value
            for obj in yaml.safe_load_all((GKE / "secrets.example.yaml").read_text())
            for key, value in obj["stringData"].items()}


# ---------------------------------------------------------------------------------------------------- the command


def gke_command() -> list[str]:
    worker = container(one("JobSet"), "octft")
    assert Path(worker["command"][0]).name == "octft", worker["command"]
    return worker["command"][1:] + worker["args"]


def skypilot_command() -> list[str]:
    """The `octft ...` words of the task's run script, with its envs filled in ($VAR, ${VAR})."""
    task = skypilot_task()
    script = task["run"].replace("\\\n", " ")
    lines = [line for line in script.splitlines() if re.search(r"\boctft sweep launch\b", line)]
    assert len(lines) == 1, f"{SKYPILOT_TASK}: run should start one `octft sweep launch`, found {lines}"
    values = {name: value or f"<{name}>" for name, value in task["envs"].items()}
    words = shlex.split(re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m[1], m[0]), lines[0]))
    start = next(index for index, word in enumerate(words) if Path(word).name == "octft")
    return words[start + 1:]


COMMANDS = {"gke": gke_command, "skypilot": skypilot_command}


@pytest.mark.parametrize("recipe", sorted(COMMANDS))
def test_each_host_runs_one_octft_sweep_launch_that_octft_accepts(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("OCTFT_OPTUNA_STORAGE", raising=False)
    argv = COMMANDS[recipe]()
    args = build_parser().parse_args(argv)  # strict: an unknown option or a stray word fails here
    assert args.func is cmd_sweep_launch, argv
    spec = Path(args.spec)
    assert spec.parent == Path("sweeps") and spec.is_file(), f"{recipe}: {args.spec} is not a sweep file in sweeps/"
    # What the launch itself checks before it creates the study: sweep keys, experiment keys, no clash with the space.
    load_launch_spec(spec, args.overrides, args.storage)
    assert args.storage is None, "the storage comes from $OCTFT_OPTUNA_STORAGE (a Secret), never the command line"
    assert args.workers >= 1


@functools.cache
def octft_variables() -> frozenset[str]:
    """Every upper-case string constant in octft's source: the environment variables it reads are among them."""
    names = set()
    for path in (REPO / "octft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"[A-Z][A-Z0-9_]+", node.value):
                    names.add(node.value)
    return frozenset(names)


def worker_variables() -> dict[str, set[str]]:
    worker = container(one("JobSet"), "octft")
    task = skypilot_task()
    return {"gke": {item["name"] for item in worker["env"]}, "skypilot": set(task["envs"]) | set(task["secrets"])}


@pytest.mark.parametrize("recipe", ["gke", "skypilot"])
def test_the_worker_gets_the_shared_stores_and_only_variables_octft_reads(recipe):
    names = worker_variables()[recipe]
    assert {"OCTFT_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "B2_APPLICATION_KEY_ID", "B2_APPLICATION_KEY"} <= names
    unknown = sorted(name for name in names if name.startswith(OCTFT_PREFIXES) and name not in octft_variables())
    assert not unknown, f"{recipe}: octft reads no variable named {unknown}"
    if recipe == "skypilot":
        task = skypilot_task()
        scripts = task["setup"] + task["run"]
        unused = sorted(name for name in task["envs"] if not re.search(rf"\${{?{name}\b", scripts))
        assert not unused, f"{SKYPILOT_TASK}: envs {unused} are used by neither setup nor run"
        assert "export PJRT_DEVICE=TPU" in task["run"]
    else:
        assert {"name": "PJRT_DEVICE", "value": "TPU"} in container(one("JobSet"), "octft")["env"]


# ---------------------------------------------------------------------------------------------------- the objects


@pytest.mark.parametrize("path", YAMLS, ids=[str(path.relative_to(DEPLOY)) for path in YAMLS])
def test_every_yaml_parses_into_objects_of_known_kinds(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path} is empty"
    if path == SKYPILOT_TASK:
        assert {"name", "resources", "setup", "run"} <= set(docs[0])
        return
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in KINDS, f"{path}: {key} is not a kind these recipes use: {sorted(KINDS)}"
        metadata = doc.get("metadata") or {}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", metadata.get("name", "")), f"{path}: {key} name"
        assert ("namespace" in metadata) == KINDS[key], f"{path}: {key[1]} {metadata['name']} namespace"
        assert metadata.get("namespace", "octft") == "octft"


def test_names_are_unique_and_workloads_select_their_own_pods():
    seen = [(obj["kind"], obj["metadata"]["name"]) for obj in kubernetes_objects()]
    assert len(seen) == len(set(seen)), seen
    for obj in kubernetes_objects():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert obj["spec"]["selector"]["matchLabels"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        if obj["kind"] == "Service":
            pods = [workload for workload in kubernetes_objects() if workload["kind"] in ("Deployment", "StatefulSet")
                    and obj["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()]
            assert len(pods) == 1, f"Service {obj['metadata']['name']} selects {len(pods)} workloads"
            ports = {port["containerPort"] for item in pod_spec(pods[0])["containers"] for port in item.get("ports", [])}
            assert {port["targetPort"] for port in obj["spec"]["ports"]} <= ports
        if obj["kind"] == "StatefulSet":
            assert by_name("Service", obj["spec"]["serviceName"])


def env_entries() -> list[tuple[str, dict]]:
    return [(f"{obj['kind']} {obj['metadata']['name']}", entry) for obj in kubernetes_objects()
            if obj["kind"] in ("Deployment", "StatefulSet", "JobSet")
            for item in pod_spec(obj)["containers"] + pod_spec(obj).get("initContainers", [])
            for entry in item.get("env", [])]


def test_credentials_come_from_secrets_and_no_file_holds_a_password():
    secrets = example_secret_values()
    for where, entry in env_entries():
        if entry["name"] in SECRET_VARIABLES:
            assert "value" not in entry, f"{where}: {entry['name']} must come from a Secret (valueFrom.secretKeyRef)"
        reference = entry.get("valueFrom", {}).get("secretKeyRef")
        if reference:
            assert (reference["name"], reference["key"]) in secrets, f"{where}: no Secret key {reference}"
    task = skypilot_task()
    assert SECRET_VARIABLES & set(task["envs"]) == set(), "SkyPilot: credentials go under secrets:, not envs:"
    assert all(value is None for value in task["secrets"].values()), "SkyPilot: secrets come from --secret, not the file"
    for (name, key), value in secrets.items():
        if any(word in key for word in ("PASSWORD", "KEY")):
            assert value == PLACEHOLDER, f"secrets.example.yaml {name}.{key}: only {PLACEHOLDER}, never a real value"
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            for password in re.findall(r"[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:([^\s/@'\"]+)@", path.read_text()):
                assert password in (PLACEHOLDER, "...", "$PGPASS"), f"{path} holds a password in a URL"


def test_the_stores_are_the_services_the_manifests_run_in_two_databases():
    secrets = example_secret_values()
    optuna_url = secrets["octft-stores", "OCTFT_OPTUNA_STORAGE"]
    mlflow_url = secrets["octft-stores", "MLFLOW_BACKEND_STORE_URI"]
    check_not_shared(mlflow_url, optuna_url)  # octft refuses one database for both (alembic_version)
    postgres = by_name("StatefulSet", "octft-postgres")
    service = by_name("Service", postgres["spec"]["serviceName"])
    postgres_env = {entry["name"]: entry.get("value") for entry in container(postgres, "postgres")["env"]}
    init_sql = "".join(by_name("ConfigMap", "octft-postgres-init")["data"].values())
    for url in (optuna_url, mlflow_url):
        parsed = urlparse(url)
        assert (parsed.hostname, parsed.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
        assert parsed.username == postgres_env["POSTGRES_USER"]
    assert urlparse(optuna_url).path == f"/{postgres_env['POSTGRES_DB']}"
    assert f"CREATE DATABASE {urlparse(mlflow_url).path.strip('/')};" in init_sql

    mlflow = by_name("Deployment", "octft-mlflow")
    server = container(mlflow, "mlflow")
    args = dict(arg.removeprefix("--").partition("=")[::2] for arg in server["args"])
    assert "serve-artifacts" in args and args["artifacts-destination"].startswith("gs://")
    assert {"name": "MLFLOW_BACKEND_STORE_URI",
            "valueFrom": {"secretKeyRef": {"name": "octft-stores", "key": "MLFLOW_BACKEND_STORE_URI"}}} in server["env"]
    tracking = next(entry["value"] for entry in container(one("JobSet"), "octft")["env"]
                    if entry["name"] == "MLFLOW_TRACKING_URI")
    mlflow_service = by_name("Service", urlparse(tracking).hostname)
    assert urlparse(tracking).port == mlflow_service["spec"]["ports"][0]["port"]
    # MLflow answers only the Host headers it is told to (its default: localhost and private IPs).
    assert urlparse(tracking).netloc in args["allowed-hosts"].split(",")


def test_the_mlflow_server_is_the_version_the_lock_pins():
    lock = (REPO / "uv.lock").read_text()
    locked = re.search(r'\nname = "mlflow"\nversion = "([^"]+)"', lock)[1]
    assert f'"mlflow=={locked}"' in (DEPLOY / "images" / "mlflow.Dockerfile").read_text()
    assert container(by_name("Deployment", "octft-mlflow"), "mlflow")["image"].endswith(f":{locked}")


def quantity(text) -> float:
    """A Kubernetes quantity (16, "500m", "96Gi") as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units.get(unit, 1)


def test_kueue_can_admit_what_the_jobset_asks_for_one_worker_per_host():
    jobset, job = one("JobSet"), jobset_job()
    local_queue = by_name("LocalQueue", jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"])
    assert local_queue["metadata"]["namespace"] == jobset["metadata"]["namespace"]
    cluster_queue = by_name("ClusterQueue", local_queue["spec"]["clusterQueue"])
    assert cluster_queue["spec"]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": jobset["metadata"]["namespace"]}
    (group,) = cluster_queue["spec"]["resourceGroups"]
    (flavor,) = group["flavors"]
    node_labels = by_name("ResourceFlavor", flavor["name"])["spec"]["nodeLabels"]
    spec = pod_spec(jobset)
    shared = node_labels.keys() & spec["nodeSelector"].keys()
    assert shared and all(node_labels[key] == spec["nodeSelector"][key] for key in shared)

    # One pod per host: the slice's chips (topology AxB) over the chips each pod takes.
    worker = container(jobset, "octft")
    chips_per_host = int(worker["resources"]["limits"]["google.com/tpu"])
    slice_chips = 1
    for side in spec["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split("x"):
        slice_chips *= int(side)
    hosts = slice_chips // chips_per_host
    assert job["replicas"] == 1
    assert job["template"]["spec"]["parallelism"] == job["template"]["spec"]["completions"] == hosts

    # Every resource a pod asks for is covered, and the quota holds one slice's pods.
    asked: dict[str, float] = {}
    for item in spec["containers"]:
        for kind in ("requests", "limits"):
            for name, value in item["resources"].get(kind, {}).items():
                asked[name] = max(asked.get(name, 0), quantity(value))
    for item in spec.get("initContainers", []):  # a pod needs the larger of its init and its running containers
        for name, value in item.get("resources", {}).get("requests", {}).items():
            asked[name] = max(asked.get(name, 0), quantity(value))
    assert set(asked) <= set(group["coveredResources"]), f"Kueue covers {group['coveredResources']}, pods ask {asked}"
    quota = {item["name"]: quantity(item["nominalQuota"]) for item in flavor["resources"]}
    for name, value in asked.items():
        assert quota[name] >= hosts * value, f"{name}: quota {quota[name]} < {hosts} pods x {value}"

    # The host's chips shared by its workers as octft shares them (`octft.train.devices.trial_device_env`).
    workers = build_parser().parse_args(gke_command()).workers
    assert chips_per_host // workers in TPU_CHIP_BOUNDS


def test_a_preempted_host_is_replaced_and_a_usage_error_stops_the_jobset():
    jobset, job = one("JobSet"), jobset_job()["template"]["spec"]
    assert pod_spec(jobset)["restartPolicy"] == "Never"  # a pod failure policy needs it
    ignore, fail = job["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"] == {"containerName": "octft", "operator": "In", "values": [2]}
    policy = jobset["spec"]["failurePolicy"]
    assert policy["maxRestarts"] >= 1
    assert policy["rules"] == [
        {"name": "usage-error", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]


def test_the_skypilot_task_joins_every_host_of_a_spot_slice_to_the_study():
    task = skypilot_task()
    resources = task["resources"]
    assert task["num_nodes"] == 1 and resources["accelerators"].startswith("tpu-") and resources["use_spot"] is True
    assert resources["job_recovery"]["strategy"] and resources["job_recovery"]["max_restarts_on_errors"] >= 1
    assert 'git clone --quiet "$REPO_URL" octft' in task["setup"] and "make install TPU=1" in task["setup"]


# ---------------------------------------------------------------------------------------------------- real tools

KUBERNETES_VERSION = "1.31"  # the oldest these manifests are written for: the Job's pod failure policy is GA there


def test_builtin_objects_and_the_jobset_job_pass_kubernetes_own_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    objects = [obj for obj in kubernetes_objects() if obj["apiVersion"] in ("v1", "apps/v1")]
    # The JobSet's Job template is a batch/v1 JobSpec: checked as a Job of its own.
    objects.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "octft-hosts"},
                    "spec": jobset_job()["template"]["spec"]})
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises, naming the field


def test_skypilot_reads_the_task():
    sky = pytest.importorskip("sky", reason="pip install skypilot")
    # A copy: SkyPilot rewrites the dict it reads.
    config = copy.deepcopy(skypilot_task())
    task = sky.Task.from_yaml_config(config, env_overrides=[("REPO_URL", "https://example.invalid/octft.git")])
    (resources,) = task.resources
    assert resources.use_spot and list(resources.accelerators) == [skypilot_task()["resources"]["accelerators"]]
    assert task.num_nodes == 1
