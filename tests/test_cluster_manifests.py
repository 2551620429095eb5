"""The cluster manifests in cluster/ are checked offline, since nothing else reads them before a real cluster does:
Kubernetes objects against the `kubernetes` package's API models, KubeRay objects against KubeRay's v1 API
(tests/k8s_schema.py), the launcher YAML against Ray's own autoscaler schema and the RayService's Serve config
against Ray Serve's deploy schema and the serve stage's own builder.

Every manifest must give Ray exactly the node types of conf/cluster/a100_nodes.yaml, mount the shared volume at
/mnt/shared, run the image cluster/Dockerfile builds and keep Serve's HAProxy ingress on. Each check also runs on a
deliberately broken copy, so a check that passes everything is caught too.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from hydra import compose, initialize_config_dir
from kubernetes.utils import parse_quantity
from omegaconf import OmegaConf

from conftest import CONF, REPO
from k8s_schema import autoscaler_node_types, cluster_specs, k8s_errors, kuberay_errors, ray_groups, ray_resources

CLUSTER = REPO / "cluster"
SHARED = "/mnt/shared"
RUN_ROOT = "/mnt/shared/ray-distill"
APP_DIR = "/app"  # where cluster/Dockerfile puts the repository
# the image cluster/Dockerfile builds, under any registry and tag
IMAGE = re.compile(r"([\w.-]+(:\d+)?/)*ray-distill(:[\w.-]+)?")
GIB = 2**30
NODE_TYPES = yaml.safe_load((CONF / "cluster" / "a100_nodes.yaml").read_text())["node_types"]
# instance types the manifests name: GPU model (plan.gpu_types' key), GPUs, vCPUs, memory GiB (AWS's published specs)
INSTANCES = {"m6i.2xlarge": (None, 0, 8, 32), "m6i.4xlarge": (None, 0, 16, 64),
             "p4d.24xlarge": ("A100-40G", 8, 96, 1152), "p4de.24xlarge": ("A100-80G", 8, 96, 1152)}
INSTANCE_LABEL = "node.kubernetes.io/instance-type"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


RAYCLUSTER = _docs("kuberay-raycluster.yaml")[0]
RAYJOBS = {d["metadata"]["name"]: d for d in _docs("kuberay-rayjob.yaml")}
RAYSERVICE = _docs("kuberay-rayservice.yaml")[0]
PVCS = {d["metadata"]["name"]: d for d in _docs("kuberay-pvc.yaml")}
LAUNCHER = _docs("aws-autoscaler.yaml")[0]
DOCKERFILE = (CLUSTER / "Dockerfile").read_text()
KUBERAY = {"raycluster": RAYCLUSTER, "rayservice": RAYSERVICE, **{f"rayjob-{n}": d for n, d in RAYJOBS.items()}}


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def pod_problems(doc: dict) -> list[str]:
    """Every pod: the project's image, the HAProxy ingress, paths on the shared volume, a defined RWX claim."""
    problems = []
    for spec in cluster_specs(doc):
        for name, group in ray_groups(spec).items():
            pod = group["template"]["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                      if "persistentVolumeClaim" in v}
            for c in pod["containers"]:
                where, env = f"{name}/{c['name']}", _env(c)
                if not IMAGE.fullmatch(c.get("image", "")):
                    problems.append(f"{where}: image {c.get('image')!r} is not the ray-distill image of the Dockerfile")
                if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
                    problems.append(f"{where}: RAY_SERVE_ENABLE_HA_PROXY=1 missing (Serve's HAProxy ingress)")
                if env.get("RAY_DISTILL_ROOT") != RUN_ROOT:
                    problems.append(f"{where}: RAY_DISTILL_ROOT is {env.get('RAY_DISTILL_ROOT')!r}, not {RUN_ROOT}")
                if not str(env.get("HF_HOME")).startswith(SHARED + "/"):
                    problems.append(f"{where}: HF_HOME {env.get('HF_HOME')!r} is not on the shared volume")
                shared = [m for m in c.get("volumeMounts", []) if m.get("mountPath") == SHARED]
                if not shared or shared[0].get("name") not in claims:
                    problems.append(f"{where}: no persistentVolumeClaim mounted at {SHARED}")
            for claim in claims.values():
                if claim not in PVCS:
                    problems.append(f"{name}: claim {claim!r} is not defined in cluster/kuberay-pvc.yaml")
                elif "ReadWriteMany" not in PVCS[claim]["spec"].get("accessModes", []):
                    problems.append(f"{name}: claim {claim!r} is not ReadWriteMany")
    images = {c.get("image") for s in cluster_specs(doc) for g in ray_groups(s).values()
              for c in g["template"]["spec"]["containers"]}
    if len(images) > 1:
        problems.append(f"pods run different images: {sorted(map(str, images))}")
    return problems


def _differences(where: str, name: str, got: dict) -> list[str]:
    want = NODE_TYPES[name]
    return [f"{where}: {k} is {v}, conf/cluster/a100_nodes.yaml says {want[k]}" for k, v in got.items() if v != want[k]]


def _instance_problems(where: str, want: dict, instance: str | None) -> list[str]:
    if instance is None:
        return [] if want["gpu_type"] is None else [f"{where}: no instance type pins gpu_type {want['gpu_type']}"]
    if instance not in INSTANCES:
        return [f"{where}: unknown instance type {instance!r} (add its specs to INSTANCES)"]
    gpu_type, gpus, vcpus, memory_gib = INSTANCES[instance]
    problems = []
    if gpu_type != want["gpu_type"]:
        problems.append(f"{where}: {instance} carries {gpu_type}, the config says {want['gpu_type']}")
    if gpus != want["gpus"] or want["cpus"] > vcpus or want["memory_gb"] > memory_gib:
        problems.append(f"{where}: {instance} ({gpus} GPUs, {vcpus} vCPUs, {memory_gib} GiB) cannot hold {want}")
    return problems


def node_type_problems(doc: dict) -> list[str]:
    """Each cluster the object creates has exactly conf/cluster/a100_nodes.yaml's node types."""
    problems = []
    for spec in cluster_specs(doc):
        if spec.get("rayVersion") != ray.__version__:
            problems.append(f"rayVersion {spec.get('rayVersion')!r} is not the installed Ray {ray.__version__}")
        groups = ray_groups(spec)
        if set(groups) != set(NODE_TYPES):
            problems.append(f"node types {sorted(groups)} are not {sorted(NODE_TYPES)}")
        for name in set(groups) & set(NODE_TYPES):
            want, group = NODE_TYPES[name], groups[name]
            cpus, gpus, memory_gb = ray_resources(group)
            low, high = (1, 1) if name == "head" else (group.get("minReplicas", 0), group.get("maxReplicas"))
            got = {"cpus": cpus, "gpus": gpus, "memory_gb": memory_gb, "min_nodes": low, "max_nodes": high}
            problems += _differences(name, name, got)
            # Ray must not schedule more than the Ray container is given (the head's 0 CPUs are fewer on purpose)
            limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
            given = (parse_quantity(limits.get("cpu", "0")), int(limits.get("nvidia.com/gpu", 0)))
            if cpus > given[0] or gpus != given[1]:
                problems.append(f"{name}: Ray gets {cpus} CPUs, {gpus} GPUs but the container {given[0]}, {given[1]}")
            selector = group["template"]["spec"].get("nodeSelector", {})
            problems += _instance_problems(name, {**want, "memory_gb": memory_gb}, selector.get(INSTANCE_LABEL))
        varies = any(t["min_nodes"] < t["max_nodes"] for t in NODE_TYPES.values())
        if varies and not spec.get("enableInTreeAutoscaling"):
            problems.append("node counts vary but enableInTreeAutoscaling is off")
    return problems


def converter_problems(doc: dict) -> list[str]:
    """What Ray's autoscaler itself reads from each cluster spec equals the config's node types."""
    problems = []
    for types in map(autoscaler_node_types, cluster_specs(doc)):
        if set(types) != set(NODE_TYPES):
            problems.append(f"the autoscaler sees node types {sorted(types)}, not {sorted(NODE_TYPES)}")
        for name in NODE_TYPES.keys() & types.keys():
            got, r = types[name], types[name]["resources"]
            seen = {"cpus": r.get("CPU"), "gpus": r.get("GPU", 0), "memory_gb": r.get("memory", 0) / GIB}
            if name != "head":  # the autoscaler counts workers only
                seen |= {"min_nodes": got["min_workers"], "max_nodes": got["max_workers"]}
            problems += _differences(f"the autoscaler's {name}", name, seen)
    return problems


@functools.lru_cache
def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def job_problems(doc: dict) -> list[str]:
    """A RayJob's entrypoint is a real stage with a real experiment, writing to the shared volume, on a cluster
    that exists, with the code where the image has it."""
    if doc["kind"] != "RayJob":
        return []
    spec, problems = doc["spec"], []
    python, script, *overrides = shlex.split(spec.get("entrypoint", ""))
    if python != "python" or not re.fullmatch(r"ray_jobs/\w+\.py", script) or not (REPO / script).is_file():
        problems.append(f"entrypoint runs {script!r}, not one of ray_jobs/<stage>.py")
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if not experiments or not (CONF / "experiment" / f"{experiments[0]}.yaml").is_file():
        problems.append(f"entrypoint names no experiment of conf/experiment/ ({overrides})")
    else:
        run_root = OmegaConf.select(_compose(*overrides), "paths.run_root")
        if not run_root.startswith(RUN_ROOT + "/"):
            problems.append(f"the job writes to {run_root}, not under {RUN_ROOT}")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
    if runtime_env.get("working_dir") != APP_DIR:
        problems.append(f"runtimeEnvYAML working_dir is {runtime_env.get('working_dir')!r}, not the image's {APP_DIR}")
    else:  # Ray's own runtime_env check, with the repository standing in for the image's copy of it
        ray.runtime_env.RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})
    if "clusterSelector" in spec and spec["clusterSelector"].get("ray.io/cluster") != RAYCLUSTER["metadata"]["name"]:
        problems.append(f"clusterSelector {spec['clusterSelector']} names no RayCluster of cluster/")
    if "rayClusterSpec" in spec and not spec.get("shutdownAfterJobFinishes"):
        problems.append("a RayJob with a cluster of its own must delete it when done (shutdownAfterJobFinishes)")
    return problems


def _expected_serve_config() -> dict:
    """What ray_jobs/serve.py writes for the preset on the cluster (tests/test_serve.py covers the builder)."""
    from pipeline.serve.app import llm_config, serve_config
    from pipeline.serve.config import serve_stage
    from pipeline.serve.model import ServedModel

    stage = serve_stage(_compose("experiment=qwen72b_to_7b", f"paths.root={RUN_ROOT}", "serve.host=0.0.0.0",
                                 "serve.autoscaling.max_replicas=4"))
    return serve_config(stage, llm_config(stage, ServedModel(stage.paths.quantized_dir, "quantized")))


def serve_problems(doc: dict) -> list[str]:
    if doc["kind"] != "RayService":
        return []
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(doc["spec"].get("serveConfigV2", ""))
    try:
        ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay's Serve controller accept
    except ValidationError as e:
        return [f"serveConfigV2 is not a Serve config: {e}"]
    problems = [f"application {app['name']} imports {app['import_path']}, not pipeline.serve.app:app_builder"
                for app in config["applications"] if app["import_path"] != "pipeline.serve.app:app_builder"]
    for app in config["applications"]:
        llm = app.get("args", {}).get("llm_config", {})
        if not llm.get("model_loading_config", {}).get("model_source", "").startswith(f"{RUN_ROOT}/qwen72b_to_7b/"):
            problems.append(f"application {app['name']} does not serve the qwen72b_to_7b student from {RUN_ROOT}")
        if llm.get("placement_group_config", {}).get("bundle_per_worker", {}).get("GPU") != 1:
            problems.append(f"application {app['name']} does not give each engine worker one GPU")
    if config != _expected_serve_config():
        problems.append("serveConfigV2 differs from what the serve stage builds for experiment=qwen72b_to_7b "
                        f"(expected:\n{yaml.safe_dump(_expected_serve_config(), sort_keys=False)})")
    return problems


def pvc_problems(pvc: dict) -> list[str]:
    problems = k8s_errors(pvc, "V1PersistentVolumeClaim", "$")
    spec = pvc.get("spec", {})
    if spec.get("accessModes") != ["ReadWriteMany"]:
        problems.append(f"{pvc['metadata']['name']}: accessModes {spec.get('accessModes')}, pods on many nodes need "
                        "[ReadWriteMany]")
    if not spec.get("storageClassName"):
        problems.append("no storageClassName: the cluster's default class is rarely ReadWriteMany")
    return problems


def launcher_problems(config: dict) -> list[str]:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    problems = [f"{e.json_path}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    if problems:
        return problems
    types = config.get("available_node_types", {})
    if set(types) != set(NODE_TYPES) or config.get("head_node_type") != "head":
        return [f"node types {sorted(types)} (head {config.get('head_node_type')}) are not {sorted(NODE_TYPES)}"]
    for name, want in NODE_TYPES.items():
        t, r = types[name], types[name]["resources"]
        low, high = (1, 1) if name == "head" else (t.get("min_workers", 0), t.get("max_workers"))
        got = {"cpus": r.get("CPU"), "gpus": r.get("GPU", 0), "memory_gb": r.get("memory", 0) / GIB,
               "min_nodes": low, "max_nodes": high}
        problems += _differences(name, name, got)
        problems += _instance_problems(name, want, t["node_config"].get("InstanceType"))
        # initialization_commands run before setup and `ray start` on each node; a worker type's own list replaces
        # them (the autoscaler's _get_node_type_specific_fields), `ray up` runs the global list on the head
        init = config.get("initialization_commands", [])
        init = " ; ".join(init if name == config["head_node_type"] else t.get("initialization_commands", init))
        efs = rf"\S+\.efs\.{config['provider'].get('region')}\.amazonaws\.com:/\S*"
        if not re.search(rf"mount -t nfs4 .*{efs} {SHARED}\b", init):
            problems.append(f"{name}: no NFS mount of the region's EFS at {SHARED} before ray start")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ; ".join(config.get(key, []))
        for var, value in (("RAY_SERVE_ENABLE_HA_PROXY", "1"), ("RAY_DISTILL_ROOT", RUN_ROOT),
                           ("HF_HOME", f"{SHARED}/\\S+")):
            if not re.search(rf"\b{var}={value}(\s|;)", start):
                problems.append(f"{key}: `ray start` runs without {var}={value}")
    if config.get("max_workers") != sum(t.get("max_workers", 0) for t in types.values()):
        problems.append("max_workers is not the sum of the node types' max_workers")
    for key in ("initialization_commands", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key, []):
            if subprocess.run(["bash", "-n", "-c", command], capture_output=True).returncode:
                problems.append(f"{key}: not valid bash: {command}")
    return problems


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    if not re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py3\d+-(gpu|cu\d+)\s*$", text, re.M):
        problems.append(f"the base is not Ray's official {ray.__version__} GPU image")
    if not re.search(rf'^RUN pip install --no-cache-dir "{APP_DIR}\[gpu\b[^"]*\]"', text, re.M):
        problems.append('the project is not installed with its GPU extras (pip install "/app[gpu,...]")')
    if not re.search(rf"^WORKDIR {APP_DIR}\s*$", text, re.M):
        problems.append(f"WORKDIR is not {APP_DIR}")
    problems += [f"{d}/ is not copied into {APP_DIR}" for d in ("pipeline", "conf", "ray_jobs")
                 if not re.search(rf"^COPY\b.*\s{d}\s+\./{d}\s*$", text, re.M)]
    if not re.search(r"docker build -f cluster/Dockerfile -t \S*ray-distill:\S+ \.", text):
        problems.append("the build command does not tag the image ray-distill that the manifests run")
    return problems


def runtime_env_problems(env: dict) -> list[str]:
    ray.runtime_env.RuntimeEnv(**{**env, "working_dir": str(REPO)})  # Ray's own validation, from the repo root
    return [f"env_vars: {k}={v!r} is not on {SHARED}" for k, v in env.get("env_vars", {}).items()
            if k in ("RAY_DISTILL_ROOT", "HF_HOME") and not str(v).startswith(SHARED + "/")]


KUBERAY_CHECKS = [kuberay_errors, pod_problems, node_type_problems, converter_problems, job_problems, serve_problems]


@pytest.mark.parametrize("check", KUBERAY_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_passes(name, check):
    assert check(KUBERAY[name]) == []


def test_other_manifests_pass():
    assert [p for pvc in PVCS.values() for p in pvc_problems(pvc)] == []
    assert launcher_problems(LAUNCHER) == []
    assert dockerfile_problems(DOCKERFILE) == []
    assert runtime_env_problems(yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())) == []


def test_every_stage_has_a_rayjob_and_every_manifest_says_how_to_apply_it():
    stages = {Path(shlex.split(j["spec"]["entrypoint"])[1]).stem for j in RAYJOBS.values()}
    assert stages == {"run", "label", "train", "quantize", "evaluate"}
    assert all(len(cluster_specs(j)) == 1 for j in RAYJOBS.values() if j["metadata"]["name"].endswith("chain"))
    for path in CLUSTER.iterdir():
        if path.suffix == ".json":  # JSON has no comments: the dashboard's description says how to use it
            assert "import" in json.loads(path.read_text())["description"].lower(), path.name
            continue
        assert path.read_text().startswith("#"), f"{path.name} does not open with a comment saying how to use it"


@pytest.mark.slow
def test_the_serve_app_builds_from_the_rayservice():
    """KubeRay's Serve controller calls app_builder(args) on the cluster; here it builds the same application
    without deploying it. Slow: it imports vLLM, and Ray Serve LLM reads the driver's runtime_env, so it needs a
    (small, local) Ray."""
    from ray.serve.llm import LLMConfig

    from pipeline.serve.app import app_builder

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for app in yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])["applications"]:
            LLMConfig(**app["args"]["llm_config"])
            assert app_builder(app["args"]) is not None
    finally:
        if started:
            ray.shutdown()


# ---- each check on a deliberately broken copy: a check that passes everything is caught ----

def _edit(doc, path: tuple, op: str, arg=None):
    """set, delete or rename (to `arg`) the field at `path`; a string on the way (serveConfigV2) is parsed as
    YAML, edited and written back."""
    key, *rest = path
    if rest and isinstance(doc[key], str):
        inner = yaml.safe_load(doc[key])
        _edit(inner, tuple(rest), op, arg)
        doc[key] = yaml.safe_dump(inner)
    elif rest:
        _edit(doc[key], tuple(rest), op, arg)
    elif op == "set":
        doc[key] = arg
    elif op == "delete":
        del doc[key]
    else:
        doc[arg] = doc.pop(key)


CHAIN, LABEL, PVC = RAYJOBS["ray-distill-chain"], RAYJOBS["ray-distill-label"], PVCS["ray-distill-shared"]
WORKER = ("spec", "workerGroupSpecs", 0)
POD = (*WORKER, "template", "spec")
WORKER_C = (*POD, "containers", 0)
HEAD_POD = ("spec", "headGroupSpec", "template", "spec")
SERVE_APP = ("spec", "serveConfigV2", "applications", 0)
SERVE_LLM = (*SERVE_APP, "args", "llm_config")
GPU_NODE = ("available_node_types", "gpu_a100")
STAGE = "python ray_jobs/label.py experiment=qwen72b_to_7b paths.root=/mnt/shared/ray-distill"
BROKEN = {
    # id: (document, check, edit, path, the edit's value or new name, a piece of the problem it must report)
    "raycluster-workerGroupSpec":
        (RAYCLUSTER, kuberay_errors, "rename", ("spec", "workerGroupSpecs"),
         "workerGroupSpec", "'workerGroupSpec' was unexpected"),
    "raycluster-maxReplica":
        (RAYCLUSTER, kuberay_errors, "rename", (*WORKER, "maxReplicas"), "maxReplica", "'maxReplica' was unexpected"),
    "raycluster-minReplicas-a-string":
        (RAYCLUSTER, kuberay_errors, "set", (*WORKER, "minReplicas"), "0", "'0' is not of type 'integer'"),
    "raycluster-gpu-outside-limits":
        (RAYCLUSTER, kuberay_errors, "set", (*WORKER_C, "nvidia.com/gpu"),
         "8", "containers[0].nvidia.com/gpu: unknown field of V1Container"),
    "raycluster-no-containers":
        (RAYCLUSTER, kuberay_errors, "delete", (*HEAD_POD, "containers"), None, "containers: required by V1PodSpec"),
    "raycluster-env-value-an-int":
        (RAYCLUSTER, kuberay_errors, "set", (*WORKER_C, "env", 0, "value"), 1, "env[0].value: expected str, got int"),
    "raycluster-memory-not-a-quantity":
        (RAYCLUSTER, kuberay_errors, "set", (*WORKER_C, "resources", "limits", "memory"),
         "1000GB", "not a Kubernetes quantity"),
    "raycluster-more-nodes-than-config":
        (RAYCLUSTER, node_type_problems, "set", (*WORKER, "maxReplicas"), 8, "gpu_a100: max_nodes is 8"),
    "raycluster-fewer-gpus-than-config":
        (RAYCLUSTER, node_type_problems, "set", (*WORKER, "rayStartParams", "num-gpus"), "4", "gpus is 4"),
    "raycluster-40gb-a100-nodes":
        (RAYCLUSTER, node_type_problems, "set", (*POD, "nodeSelector", INSTANCE_LABEL),
         "p4d.24xlarge", "p4d.24xlarge carries A100-40G, the config says A100-80G"),
    "raycluster-autoscaler-sees-other-cpus":
        (RAYCLUSTER, converter_problems, "set", (*WORKER, "rayStartParams", "num-cpus"), "96", "cpus is 96"),
    "raycluster-image-without-the-project":
        (RAYCLUSTER, pod_problems, "set", (*WORKER_C, "image"),
         "rayproject/ray:2.60.0-py311-gpu", "is not the ray-distill image"),
    "raycluster-no-haproxy-ingress":
        (RAYCLUSTER, pod_problems, "delete", (*WORKER_C, "env", 0), None, "RAY_SERVE_ENABLE_HA_PROXY=1 missing"),
    "raycluster-undefined-claim":
        (RAYCLUSTER, pod_problems, "set", (*POD, "volumes", 0, "persistentVolumeClaim", "claimName"),
         "scratch", "'scratch' is not defined"),
    "rayjob-shutdownAfterJobFinish":
        (CHAIN, kuberay_errors, "rename", ("spec", "shutdownAfterJobFinishes"),
         "shutdownAfterJobFinish", "'shutdownAfterJobFinish' was unexpected"),
    "rayjob-ttl-a-string":
        (CHAIN, kuberay_errors, "set", ("spec", "ttlSecondsAfterFinished"), "600", "'600' is not of type 'integer'"),
    "rayjob-cluster-keeps-a-gpu-node":
        (CHAIN, node_type_problems, "set", ("spec", "rayClusterSpec", *WORKER[1:], "minReplicas"), 1, "min_nodes is 1"),
    "rayjob-code-not-from-the-image":
        (CHAIN, job_problems, "set", ("spec", "runtimeEnvYAML"), "working_dir: /src\n", "not the image's /app"),
    "rayjob-no-cluster-at-all":
        (LABEL, kuberay_errors, "delete", ("spec", "clusterSelector"),
         None, "is not valid under any of the given schemas"),
    "rayjob-unknown-stage":
        (LABEL, job_problems, "set", ("spec", "entrypoint"),
         STAGE.replace("label", "distill"), "not one of ray_jobs/<stage>.py"),
    "rayjob-unknown-experiment":
        (LABEL, job_problems, "set", ("spec", "entrypoint"), STAGE.replace("72", "70"), "names no experiment"),
    "rayjob-writes-off-the-shared-volume":
        (LABEL, job_problems, "set", ("spec", "entrypoint"),
         STAGE.replace("/mnt/shared", "/tmp"), "not under /mnt/shared/ray-distill"),
    "rayjob-selects-another-cluster":
        (LABEL, job_problems, "set", ("spec", "clusterSelector", "ray.io/cluster"),
         "raycluster-kuberay", "names no RayCluster"),
    "rayservice-rayClusterSpec":
        (RAYSERVICE, kuberay_errors, "rename", ("spec", "rayClusterConfig"),
         "rayClusterSpec", "'rayClusterSpec' was unexpected"),
    "serveconfig-app-without-import-path":
        (RAYSERVICE, serve_problems, "delete", (*SERVE_APP, "import_path"), None, "import_path"),
    "serveconfig-serves-the-hub-model":
        (RAYSERVICE, serve_problems, "set", (*SERVE_LLM, "model_loading_config", "model_source"),
         "Qwen/Qwen2.5-7B-Instruct", "does not serve the qwen72b_to_7b student"),
    "serveconfig-engine-on-cpu":
        (RAYSERVICE, serve_problems, "set", (*SERVE_LLM, "placement_group_config", "bundle_per_worker"),
         {"CPU": 1}, "one GPU"),
    "serveconfig-drifts-from-the-serve-stage":
        (RAYSERVICE, serve_problems, "set", (*SERVE_LLM, "engine_kwargs", "max_model_len"),
         32768, "differs from what the serve stage builds"),
    "pvc-read-write-once":
        (PVC, pvc_problems, "set", ("spec", "accessModes"), ["ReadWriteOnce"], "need [ReadWriteMany]"),
    "pvc-storageClass":
        (PVC, pvc_problems, "rename", ("spec", "storageClassName"), "storageClass", "did you mean 'storageClassName'"),
    "launcher-unknown-key":
        (LAUNCHER, launcher_problems, "set", ("worker_nodes",), {}, "'worker_nodes' was unexpected"),
    "launcher-more-nodes-than-config":
        (LAUNCHER, launcher_problems, "set", (*GPU_NODE, "max_workers"), 8, "gpu_a100: max_nodes is 8"),
    "launcher-40gb-a100-nodes":
        (LAUNCHER, launcher_problems, "set", (*GPU_NODE, "node_config", "InstanceType"),
         "p4d.24xlarge", "p4d.24xlarge carries A100-40G, the config says A100-80G"),
    "launcher-no-shared-storage":
        (LAUNCHER, launcher_problems, "delete", ("initialization_commands",), None, "head: no NFS mount"),
    "launcher-gpu-nodes-skip-the-mount":
        (LAUNCHER, launcher_problems, "set", (*GPU_NODE, "initialization_commands"), [], "gpu_a100: no NFS mount"),
    "launcher-no-haproxy-ingress":
        (LAUNCHER, launcher_problems, "set", ("worker_start_ray_commands", 1),
         "ray start --address=$RAY_HEAD_IP:6379", "without RAY_SERVE_ENABLE_HA_PROXY=1"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_copy_fails_the_check(case):
    doc, check, op, path, arg, expected = BROKEN[case]
    broken = copy.deepcopy(doc)
    _edit(broken, path, op, arg)
    problems = check(broken)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("edit,expected", [
    (lambda t: t.replace('"/app[gpu,quant,galore]"', '"/app[cpu]"'), "GPU extras"),
    (lambda t: t.replace("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.59.0-py311-gpu"), "base is not"),
    (lambda t: t.replace("COPY --chown=ray:users ray_jobs ./ray_jobs", ""), "ray_jobs/ is not copied"),
], ids=["dockerfile-cpu-extras", "dockerfile-other-ray", "dockerfile-no-entrypoints"])
def test_broken_dockerfile_fails_the_check(edit, expected):
    assert any(expected in p for p in dockerfile_problems(edit(DOCKERFILE)))


def test_broken_runtime_env_fails_the_check():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env["env_vars"]["RAY_DISTILL_ROOT"] = "/tmp/ray-distill"
    assert runtime_env_problems(env) == ["env_vars: RAY_DISTILL_ROOT='/tmp/ray-distill' is not on /mnt/shared"]
