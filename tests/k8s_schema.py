"""Strict offline validation of the Kubernetes manifests in cluster/: core objects against the `kubernetes` package's
OpenAPI models, KubeRay's ray.io/v1 objects against a JSON schema written here.

`kubectl apply` prunes or rejects nothing until a cluster is at hand, and a misspelled field in a pod template or a
RayCluster is silently dropped by the API server, so the tests check field names, scalar types and required fields
here instead. The KubeRay schema follows the ray.io/v1 API of KubeRay v1.7.0 (ray-operator/apis/ray/v1/*_types.go
and docs/reference/api.md of that release), written by hand from that reference: KubeRay's CRD is not vendored.
Status fields are left out (nobody writes them); the operator's own checks that a schema can express are added
(enums of its Go constants, a RayJob names a cluster spec or a cluster, a TTL needs shutdownAfterJobFinishes). The last helpers read
a KubeRay object the way Ray does: its clusters, node types and the resources Ray gets on each.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from typing import Any, Iterator

import jsonschema
from kubernetes.client import models
from kubernetes.utils import parse_quantity

# How the generated models spell scalars; "object" is int-or-string (ports) in every model a pod reaches.
_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "object": (str, int),
            "datetime": (str,), "bytes": (str,)}
# the pinned release spells containers List[X] / Dict[str, X]; the older generator wrote list[X] / dict(str, X)
_LIST = re.compile(r"(?:List|list)\[(.+)\]")
_DICT = re.compile(r"(?:Dict\[str, (.+)\]|dict\(str, (.+)\))")
# resource maps are Dict[str, str] in the models but must also parse as quantities ("8", 500m, 32Gi)
_QUANTITY_MAPS = {"V1ResourceRequirements", "V1VolumeResourceRequirements"}


def _required(cls: type) -> set[str]:
    """The attributes a model requires: the pinned `kubernetes` generates pydantic models, whose fields without a
    default are exactly the API's required fields."""
    return {name for name, field in cls.model_fields.items() if field.is_required()}


def k8s_errors(value: Any, type_name: str, path: str) -> list[str]:
    """Every problem in `value` read as the OpenAPI type `type_name` (e.g. 'V1PodTemplateSpec'): an unknown field,
    a wrong scalar type (bools are not ints, numbers are not strings) or a missing required field."""
    if m := _LIST.fullmatch(type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in k8s_errors(item, m.group(1), f"{path}[{i}]")]
    if m := _DICT.fullmatch(type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a map, got {type(value).__name__}"]
        return [e for k, v in value.items() for e in k8s_errors(v, m.group(1) or m.group(2), f"{path}.{k}")]
    if type_name in _SCALARS:
        if isinstance(value, bool) and type_name != "bool" or not isinstance(value, _SCALARS[type_name]):
            return [f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"]
        return []
    cls = getattr(models, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object, got {type(value).__name__}"]
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in by_key:
            close = difflib.get_close_matches(key, by_key, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{path}.{key}: unknown field of {type_name}{hint}")
            continue
        errors += k8s_errors(item, cls.openapi_types[by_key[key]], f"{path}.{key}")
        if type_name in _QUANTITY_MAPS and isinstance(item, dict):
            for name, quantity in item.items():
                try:
                    parse_quantity(quantity)
                except (ValueError, TypeError, ArithmeticError):
                    errors.append(f"{path}.{key}.{name}: {quantity!r} is not a Kubernetes quantity")
    errors += [f"{path}.{cls.attribute_map[attr]}: required by {type_name}, missing"
               for attr in sorted(_required(cls)) if cls.attribute_map[attr] not in value]
    return errors


# ---- KubeRay ray.io/v1 (KubeRay v1.7.0) ----

def _obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def _k8s(type_name: str) -> dict:
    """A Kubernetes type inside a KubeRay object, checked by `k8s_errors` (the `x-k8s` keyword below)."""
    return {"x-k8s": type_name}


def _enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


_STR, _BOOL, _NUM = {"type": "string"}, {"type": "boolean"}, {"type": "number"}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_NONNEG = {**_INT32, "minimum": 0}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_PULL = _enum("Always", "Never", "IfNotPresent")
_MANAGED_BY = _enum("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
_POLICY_RULES = {"ingressRules": _k8s("List[V1NetworkPolicyIngressRule]"),
                 "egressRules": _k8s("List[V1NetworkPolicyEgressRule]")}

_HEAD_GROUP = _obj({
    "template": _k8s("V1PodTemplateSpec"), "headService": _k8s("V1Service"), "enableIngress": _BOOL,
    "ingressOptions": _obj({"host": _STR, "path": _STR, "pathType": _enum("Exact", "Prefix", "ImplementationSpecific"),
                            "tls": _k8s("List[V1IngressTLS]")}),
    "resources": _STR_MAP, "labels": _STR_MAP, "rayStartParams": _STR_MAP,
    "serviceType": _enum("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"),
}, required=("template",))

_WORKER_GROUP = _obj({
    "suspend": _BOOL, "groupName": _STR, "replicas": _NONNEG, "minReplicas": _NONNEG, "maxReplicas": _NONNEG,
    "idleTimeoutSeconds": _NONNEG, "priority": _INT32, "resources": _STR_MAP, "labels": _STR_MAP,
    "rayStartParams": _STR_MAP, "template": _k8s("V1PodTemplateSpec"),
    "scaleStrategy": _obj({"workersToDelete": {"type": "array", "items": _STR}}),
    "numOfHosts": {**_INT32, "minimum": 1},
}, required=("groupName", "minReplicas", "maxReplicas", "template"))  # the CRD requires both counts

_REDIS_CREDENTIAL = _obj({"valueFrom": _k8s("V1EnvVarSource"), "value": _STR})

RAY_CLUSTER_SPEC = _obj({
    "upgradeStrategy": _obj({"type": _enum("Recreate", "None")}),
    "authOptions": _obj({"enableK8sTokenAuth": _BOOL, "secretName": _STR, "mode": _enum("disabled", "token")}),
    "suspend": _BOOL,
    "managedBy": _MANAGED_BY,
    "autoscalerOptions": _obj({
        "resources": _k8s("V1ResourceRequirements"), "image": _STR, "imagePullPolicy": _PULL,
        "securityContext": _k8s("V1SecurityContext"), "idleTimeoutSeconds": _NONNEG,
        "upscalingMode": _enum("Default", "Aggressive", "Conservative"), "version": _enum("v1", "v2"),
        "env": _k8s("List[V1EnvVar]"), "envFrom": _k8s("List[V1EnvFromSource]"),
        "volumeMounts": _k8s("List[V1VolumeMount]"), "command": {"type": "array", "items": _STR},
        "args": {"type": "array", "items": _STR},
    }),
    "headServiceAnnotations": _STR_MAP,
    "enableInTreeAutoscaling": _BOOL,
    "gcsFaultToleranceOptions": _obj({
        "backend": _enum("redis", "rocksdb"), "redisUsername": _REDIS_CREDENTIAL, "redisPassword": _REDIS_CREDENTIAL,
        "externalStorageNamespace": _STR, "redisAddress": _STR,
        "storage": _obj({"claimName": _STR, "size": {"type": ["string", "integer"]}, "storageClassName": _STR,
                         "accessModes": {"type": "array", "items": _STR}, "subPath": _STR,
                         "deletionPolicy": _enum("DeleteWithCluster", "Retain")}),
    }),
    "historyServerOptions": _obj({"collectorOptions": _obj({
        "image": _STR, "imagePullPolicy": _PULL, "resources": _k8s("V1ResourceRequirements"),
        "env": _k8s("List[V1EnvVar]")})}),
    "networkPolicy": _obj({
        "mode": _enum("DenyAll", "DenyAllIngress", "DenyAllEgress"), "head": _obj(_POLICY_RULES),
        "worker": _obj(_POLICY_RULES),
        "workerGroups": {"type": "array", "items": _obj({"groupName": _STR, **_POLICY_RULES}, required=("groupName",))},
    }),
    "tlsOptions": _obj({"enabled": _BOOL}),
    "headGroupSpec": _HEAD_GROUP,
    "rayVersion": _STR,
    "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
}, required=("headGroupSpec",))

_DELETION_POLICY = _enum("DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone")
_RAY_JOB_SPEC = {
    **_obj({
        "activeDeadlineSeconds": {**_INT32, "minimum": 1}, "backoffLimit": _NONNEG,
        "rayClusterSpec": RAY_CLUSTER_SPEC, "submitterPodTemplate": _k8s("V1PodTemplateSpec"),
        "metadata": _STR_MAP, "clusterSelector": _STR_MAP, "submitterConfig": _obj({"backoffLimit": _NONNEG}),
        "managedBy": _MANAGED_BY,
        "deletionStrategy": _obj({
            "onSuccess": _obj({"policy": _DELETION_POLICY}), "onFailure": _obj({"policy": _DELETION_POLICY}),
            "deletionRules": {"type": "array", "minItems": 1, "items": _obj({
                "policy": _DELETION_POLICY,
                "condition": _obj({"jobStatus": _enum("SUCCEEDED", "FAILED"), "jobDeploymentStatus": _enum("Failed"),
                                   "ttlSeconds": _NONNEG}),
            }, required=("policy", "condition"))},
        }),
        "entrypoint": _STR, "runtimeEnvYAML": _STR, "jobId": _STR,
        "submissionMode": _enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
        "entrypointResources": _STR, "entrypointNumCpus": _NUM, "entrypointNumGpus": _NUM,
        "ttlSecondsAfterFinished": _NONNEG, "preRunningDeadlineSeconds": {**_INT32, "minimum": 1},
        "shutdownAfterJobFinishes": _BOOL, "suspend": _BOOL,
    }),
    # operator rules: a job runs on a cluster spec of its own or on the cluster named by clusterSelector; a TTL
    # only applies when the cluster is shut down after the job
    "anyOf": [{"required": ["rayClusterSpec"]},
              {"required": ["clusterSelector"], "properties": {"clusterSelector": {"required": ["ray.io/cluster"]}}}],
    "if": {"required": ["ttlSecondsAfterFinished"], "properties": {"ttlSecondsAfterFinished": {"minimum": 1}}},
    "then": {"required": ["shutdownAfterJobFinishes"], "properties": {"shutdownAfterJobFinishes": {"const": True}}},
}

_RAY_SERVICE_SPEC = _obj({
    "rayClusterDeletionDelaySeconds": _NONNEG, "serviceUnhealthySecondThreshold": _INT32,
    "deploymentUnhealthySecondThreshold": _INT32, "serveService": _k8s("V1Service"),
    "upgradeStrategy": _obj({
        "type": _enum("NewClusterWithIncrementalUpgrade", "NewCluster", "None"),
        "clusterUpgradeOptions": _obj({"maxSurgePercent": _INT32, "stepSizePercent": _INT32,
                                       "intervalSeconds": _INT32, "gatewayClassName": _STR},
                                      required=("stepSizePercent", "intervalSeconds", "gatewayClassName")),
    }),
    "managedBy": _MANAGED_BY, "serveConfigV2": _STR, "rayClusterConfig": RAY_CLUSTER_SPEC,
    "excludeHeadPodFromServeSvc": _BOOL, "suspend": _BOOL,
}, required=("rayClusterConfig",))


def _resource(kind: str, spec: dict) -> dict:
    meta = {"allOf": [_k8s("V1ObjectMeta"), {"required": ["name"]}]}
    return _obj({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": meta, "spec": spec},
                required=("apiVersion", "kind", "metadata", "spec"))


KUBERAY_SCHEMAS = {"RayCluster": _resource("RayCluster", RAY_CLUSTER_SPEC),
                   "RayJob": _resource("RayJob", _RAY_JOB_SPEC),
                   "RayService": _resource("RayService", _RAY_SERVICE_SPEC)}


def _x_k8s(validator, type_name, instance, schema) -> Iterator[jsonschema.ValidationError]:
    for error in k8s_errors(instance, type_name, ""):  # the path below the instance; kuberay_errors adds above
        yield jsonschema.ValidationError(error)


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-k8s": _x_k8s})


def kuberay_errors(doc: dict) -> list[str]:
    """Every problem of a RayCluster, RayJob or RayService, each with its path (pod templates included)."""
    schema = KUBERAY_SCHEMAS.get(doc.get("kind"))
    if schema is None:
        return [f"kind {doc.get('kind')!r} is not a KubeRay ray.io/v1 kind ({', '.join(KUBERAY_SCHEMAS)})"]
    return [f"{e.json_path}{e.message}" if e.validator == "x-k8s" else f"{e.json_path}: {e.message}"
            for e in _Validator(schema).iter_errors(doc)]


# ---- what Ray makes of a KubeRay object ----

def cluster_specs(doc: dict) -> list[dict]:
    """The RayClusterSpecs a KubeRay object creates (none for a RayJob that runs on an existing cluster)."""
    spec = doc["spec"]
    found = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}
    return [found[doc["kind"]]] if found.get(doc["kind"]) else []


def ray_groups(spec: dict) -> dict[str, dict]:
    """Ray node type name -> KubeRay group: `head`, and each worker group's name with `_` for `-` (Kubernetes
    names allow no underscore, the config's node types use it)."""
    return {"head": spec["headGroupSpec"], **{g["groupName"].replace("-", "_"): g for g in spec["workerGroupSpecs"]}}


def ray_resources(group: dict) -> tuple[int, int, float]:
    """CPUs, GPUs and memory (GiB) Ray gets on a pod of a KubeRay group: the group's `resources`, else its
    rayStartParams, else the Ray container's limits, the order in which KubeRay and Ray's autoscaler read them."""
    res, params = group.get("resources", {}), group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    cpus = res.get("CPU", params.get("num-cpus", limits.get("cpu", "0")))
    gpus = res.get("GPU", params.get("num-gpus", limits.get("nvidia.com/gpu", "0")))
    memory = res.get("memory", params.get("memory", limits.get("memory", "0")))
    return math.ceil(parse_quantity(cpus)), math.ceil(parse_quantity(gpus)), float(parse_quantity(memory)) / 2**30


def autoscaler_node_types(spec: dict) -> dict[str, dict]:
    """The node types Ray's autoscaler derives from a RayClusterSpec, named as ray_groups names them."""
    # Ray 2.60 has no public API for this; the private function is what the autoscaler (v1 and v2) runs on the
    # live RayCluster each iteration, so it is the ground truth of what will be scaled, better than a re-implementation
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": "ray-distill", "namespace": "default"}, "spec": copy.deepcopy(spec)}
    derived = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    return {("head" if name == "headgroup" else name.replace("-", "_")): t for name, t in derived.items()}
