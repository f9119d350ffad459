"""deploy/k8s: every manifest validates against the Kubernetes schemas (kubernetes-validate, offline), the
kustomizations reference files that exist, container commands are deploy/topology.py's, and the overlays render
(with `kubectl kustomize` when kubectl is installed) into valid objects."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy import topology

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.32.0"  # the pod-index label used for the learner's node rank needs >= 1.28
OVERLAYS = ["cpu", "gpu"]


def kustomization(d: Path) -> dict[str, Any]:
    return yaml.safe_load((d / "kustomization.yaml").read_text())


def patch_files(d: Path) -> set[str]:
    return {p["path"] for p in kustomization(d).get("patches", []) if "path" in p}


def resource_files(d: Path) -> list[Path]:
    """Manifest files of one kustomization, recursing into directories (what `resources:` pulls in)."""
    out: list[Path] = []
    for r in kustomization(d).get("resources", []):
        p = (d / r).resolve()
        out.extend(resource_files(p) if p.is_dir() else [p])
    return out


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomizations_reference_existing_files() -> None:
    for d in [K8S / "base", *(K8S / "overlays" / o for o in OVERLAYS)]:
        k = kustomization(d)
        for r in k.get("resources", []):
            target = d / r
            assert target.exists(), f"{d.name}: resource {r} missing"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{r} has no kustomization.yaml"
        for p in patch_files(d):
            assert (d / p).is_file(), f"{d.name}: patch {p} missing"


def manifest_files() -> list[Path]:
    """Every complete manifest (not kustomizations, not patches) that some kustomization pulls in."""
    files = {f for d in (K8S / "overlays" / o for o in OVERLAYS) for f in resource_files(d)}
    patches = {(d / p).resolve() for d in [K8S / "base", *(K8S / "overlays" / o for o in OVERLAYS)]
               for p in patch_files(d)}  # fmt: skip
    on_disk = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk == files | patches, f"manifests no kustomization uses: {sorted(on_disk - files - patches)}"
    return sorted(files)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates_against_its_schema(path: Path) -> None:
    objs = docs(path)
    assert objs
    for doc in objs:
        validate(doc)


def test_the_validator_rejects_a_broken_manifest() -> None:
    doc = docs(K8S / "base" / "actor.yaml")[1]
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "not-a-port"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)
    doc = docs(K8S / "base" / "actor.yaml")[1]
    doc["spec"]["replicaz"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)


def containers_by_name() -> dict[str, dict[str, Any]]:
    out = {}
    for f in resource_files(K8S / "base"):
        for doc in docs(f):
            if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
                (c,) = doc["spec"]["template"]["spec"]["containers"]
                out[doc["metadata"]["name"]] = {"kind": doc["kind"], **c, "spec": doc["spec"]}
    return out


def test_base_commands_are_the_topology() -> None:
    containers = containers_by_name()
    assert set(containers) == {s.name for s in topology.SERVICES} | {"prepare"}
    for svc in topology.SERVICES:
        assert containers[svc.name]["command"] == topology.container_argv(svc.name), svc.name
    prepare = containers["prepare"]["command"]
    assert prepare[:3] == topology.prepare_argv("container") and "--ready-file" in prepare


def test_services_read_the_resolved_config_from_their_init_container() -> None:
    """Every pod that reads TBRM_RUN_CONFIG resolves the ConfigMap's TOML first, like `tbrm up` does."""
    config_dir = str(Path(topology.CONTAINER_RUN_CONFIG).parent)
    for name, c in containers_by_name().items():
        if name == "redis":
            continue
        spec = c["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["run-config-source"]["configMap"]["name"] == "tbrm-run-config", name
        assert "emptyDir" in volumes["run-config"], name
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts[config_dir] == "run-config", name
        if name == "prepare":
            continue
        (init,) = spec["initContainers"]
        assert init["command"] == [*topology.prepare_argv("container"), "--config-only"]
        assert init["image"] == c["image"]
        init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        assert init_mounts == {"/etc/tbrm": "run-config-source", config_dir: "run-config"}
        assert str(Path(topology.CONTAINER_RUN_CONFIG_SOURCE).parent) == "/etc/tbrm"


def test_base_shape_actor_scales_learner_is_a_statefulset_redis_persists() -> None:
    c = containers_by_name()
    assert c["actor"]["kind"] == "Deployment" and c["actor"]["spec"]["replicas"] >= 1
    assert all("hostPort" not in p for p in c["actor"]["ports"])
    env = {e["name"]: e for e in c["actor"]["env"]}
    assert env[topology.ENV_ACTOR_PUBLIC_URL]["value"] == "http://$(POD_IP):8100"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert topology.ENV_ACTOR_ID in env
    assert c["learner"]["kind"] == "StatefulSet" and c["learner"]["spec"]["serviceName"] == "learner-headless"
    assert c["redis"]["kind"] == "StatefulSet"
    assert c["redis"]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # Services exist for every service name the shared environment uses.
    services = {d["metadata"]["name"]: d for f in resource_files(K8S / "base") for d in docs(f) if d["kind"] == "Service"}
    assert {"redis", "reward", "buffer", "actor", "learner", "learner-headless"} <= set(services)
    assert services["learner-headless"]["spec"]["clusterIP"] == "None"
    for s in topology.SERVICES:
        assert services[s.name]["spec"]["ports"][0]["port"] == s.port, s.name


def test_shared_env_configmap_is_the_topology() -> None:
    (gen,) = [g for g in kustomization(K8S / "base")["configMapGenerator"] if g["name"] == "tbrm-env"]
    literals = dict(item.split("=", 1) for item in gen["literals"])
    assert literals == topology.shared_env("container")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: overlays checked file by file only")
    tmp = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tmp)
    out = {}
    for o in OVERLAYS:
        # The two files an operator provides (gitignored): the run TOML and the token.
        shutil.copy(REPO / "configs" / "toy.toml", tmp / "overlays" / o / "run.toml")
        (tmp / "overlays" / o / "secret.env").write_text("TBRM_AUTH_TOKEN=test-token\n")
        res = subprocess.run([kubectl, "kustomize", str(tmp / "overlays" / o)], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr
        out[o] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlays_validate_and_keep_the_topology(overlay: str, rendered: dict[str, list]) -> None:
    objs = rendered[overlay]
    for doc in objs:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "tbrm", doc["metadata"]["name"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in objs}
    assert ("Secret", "tbrm-auth") in kinds and ("ConfigMap", "tbrm-run-config") in kinds
    workloads = {d["metadata"]["name"]: d for d in objs if d["kind"] in ("Deployment", "StatefulSet")}
    for svc in topology.SERVICES:
        (c,) = workloads[svc.name]["spec"]["template"]["spec"]["containers"]
        argv = topology.container_argv(svc.name)
        # Either exactly the topology's command, or it under a launcher that replaces `python` (torchrun).
        assert c["command"] == argv or c["command"][-len(argv) + 1 :] == argv[1:], (overlay, svc.name)
        assert "image" in c and not c["image"].startswith("tbrm-"), "image placeholder not replaced"


def test_gpu_overlay_runs_a_multinode_learner_and_gpu_actors(rendered: dict[str, list]) -> None:
    objs = {(d["kind"], d["metadata"]["name"]): d for d in rendered["gpu"]}
    learner = objs[("StatefulSet", "learner")]
    (c,) = learner["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert c["command"][0] == "torchrun"
    assert int(env["NNODES"]["value"]) == learner["spec"]["replicas"] > 1
    assert "pod-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "--master-addr=learner-0.learner-headless" in c["command"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == int(env["GPUS_PER_NODE"]["value"])
    (a,) = objs[("Deployment", "actor")]["spec"]["template"]["spec"]["containers"]
    assert a["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_cpu_overlay_workers_wait_for_the_prepare_job(rendered: dict[str, list]) -> None:
    objs = {(d["kind"], d["metadata"]["name"]): d for d in rendered["cpu"]}
    (c,) = objs[("Job", "prepare")]["spec"]["template"]["spec"]["containers"]
    ready = c["command"][c["command"].index("--ready-file") + 1]
    for key in (("Deployment", "actor"), ("StatefulSet", "learner")):
        init = objs[key]["spec"]["template"]["spec"]["initContainers"]
        assert [i["name"] for i in init] == ["resolve-config", "wait-for-prepare"]
        assert ready in init[1]["command"][-1]
    pvcs = [d for d in rendered["cpu"] if d["kind"] == "PersistentVolumeClaim"]
    assert pvcs and all(p["spec"]["accessModes"] == ["ReadWriteOnce"] for p in pvcs)
