"""Containers, Cloud Build, Kubernetes and Vertex AI specs, checked offline.

Kubernetes manifests are rendered the way `kubectl apply -k` renders them and validated against
the Kubernetes OpenAPI schemas that ship inside kubernetes-validate (strict: unknown fields fail).
Rendering uses a real Kustomize when one is on PATH (`kustomize build`, or `kubectl kustomize`);
otherwise the small renderer below, which implements only what infra/ uses (resources, labels,
namespace, images, map-only strategic-merge patches) and refuses anything else. When a real
Kustomize is present, a test checks the small renderer gives exactly its output.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests import dockerfile_recipe

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
OVERLAYS = ("dev", "prod")
# The oldest and newest Kubernetes the pinned kubernetes-validate ships schemas for: the range GKE's
# release channels span.
K8S_VERSIONS = ("1.33.0", "1.37.0")
BIN = Path(sys.executable).parent
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}


# ---- rendering --------------------------------------------------------------------------------

def real_kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_with_kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([*real_kustomize(), str(directory)], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _merge_maps(target: dict, patch: dict, where: str) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_maps(target[key], value, f"{where}.{key}")
        elif isinstance(value, list):
            raise NotImplementedError(f"small renderer: list in patch at {where}.{key}")
        else:
            target[key] = copy.deepcopy(value)


def _set_images(node, images: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                for container in value:
                    name = re.split(r"[:@]", container["image"], maxsplit=1)[0]
                    if name in images:
                        new = images[name]
                        ref = new.get("newName", name)
                        if "digest" in new:
                            ref += "@" + new["digest"]
                        elif "newTag" in new:
                            ref += ":" + str(new["newTag"])
                        container["image"] = ref
            else:
                _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def render_small(directory: Path) -> list[dict]:
    """The subset of Kustomize that infra/ uses; anything else raises."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "labels", "namespace", "images", "patches"}
    if set(spec) - known:
        raise NotImplementedError(f"small renderer: {sorted(set(spec) - known)} in {directory}")
    docs: list[dict] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += render_small(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise NotImplementedError(f"small renderer: patch {patch}")
        for change in yaml.safe_load_all((directory / patch["path"]).read_text()):
            targets = [d for d in docs if d["kind"] == change["kind"]
                       and d["metadata"]["name"] == change["metadata"]["name"]]
            assert len(targets) == 1, f"patch target {change['kind']}/{change['metadata']['name']}"
            _merge_maps(targets[0], change, change["kind"])
    for label in spec.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise NotImplementedError("small renderer: labels on selectors or templates")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    _set_images(docs, {image["name"]: image for image in spec.get("images", [])})
    return docs


def render(directory: Path) -> list[dict]:
    return render_with_kustomize(directory) if real_kustomize() else render_small(directory)


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(INFRA / "overlays" / request.param)


def train_job(docs):
    return by_kind(docs, "Job", "image-classifier-train")


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    (only,) = pod_spec(job)["containers"]
    return only


# ---- Kubernetes -------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_manifest_passes_strict_kubernetes_schema(overlay, version):
    name, docs = overlay
    assert len(docs) >= 6
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_schema_validation_rejects_an_unknown_field(overlay):
    job = copy.deepcopy(train_job(overlay[1]))
    container(job)["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePulPolicy"):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


@pytest.mark.skipif(real_kustomize() is None, reason="no kustomize or kubectl on PATH")
@pytest.mark.parametrize("directory", ["base", "overlays/dev", "overlays/prod"])
def test_small_renderer_gives_exactly_kustomizes_output(directory):
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    real = sorted(render_with_kustomize(INFRA / directory), key=key)
    small = sorted(render_small(INFRA / directory), key=key)
    assert small == real


def test_job_fails_at_once_on_config_error_and_retries_preemptions_uncounted(overlay):
    for job in (train_job(overlay[1]), by_kind(overlay[1], "Job", "image-classifier-multiworker")):
        rules = job["spec"]["podFailurePolicy"]["rules"]
        by_action = {}
        for rule in rules:
            by_action.setdefault(rule["action"], []).append(rule)
        (fail,) = by_action["FailJob"]
        assert fail["onExitCodes"] == {"containerName": "train", "operator": "In", "values": [2]}
        ignored = by_action["Ignore"]
        assert {"type": "DisruptionTarget", "status": "True"} in [
            c for r in ignored for c in r.get("onPodConditions", [])]
        assert [75] in [r["onExitCodes"]["values"] for r in ignored if "onExitCodes" in r]
        assert pod_spec(job)["restartPolicy"] == "Never"  # podFailurePolicy requires it
        assert job["spec"]["backoffLimit"] >= 1
        assert job["spec"]["activeDeadlineSeconds"] > 0
        assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_job_takes_one_gpu_on_gpu_nodes(overlay):
    job = train_job(overlay[1])
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cloud.google.com/gke-accelerator" in pod_spec(job)["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(job)["tolerations"]


def test_job_runs_as_the_workload_identity_service_account_without_keys(overlay):
    name, docs = overlay
    account = by_kind(docs, "ServiceAccount")
    google_account = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert re.fullmatch(rf"[a-z0-9-]+@acme-ml-{name}\.iam\.gserviceaccount\.com", google_account)
    for job in [d for d in docs if d["kind"] == "Job"]:
        assert pod_spec(job)["serviceAccountName"] == account["metadata"]["name"]
        names = [e["name"] for e in container(job).get("env", [])]
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in names
        assert all("secret" not in v for v in pod_spec(job).get("volumes", []))


def test_job_settings_come_from_the_configmap_and_run_id_from_the_job_name(overlay):
    docs = overlay[1]
    config = by_kind(docs, "ConfigMap")
    for job in [d for d in docs if d["kind"] == "Job"]:
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in container(job)["envFrom"]
        run_id = {e["name"]: e for e in container(job)["env"]}["RUN_ID"]
        assert run_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['job-name']"
    assert "RUN_ID" not in config["data"]


def test_cronjob_runs_the_same_job_spec_never_concurrently(overlay):
    docs = overlay[1]
    cron = by_kind(docs, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["jobTemplate"]["spec"] == train_job(docs)["spec"]


def test_overlays_set_bucket_image_and_schedule_per_environment():
    seen = {}
    for name in OVERLAYS:
        docs = render(INFRA / "overlays" / name)
        data = by_kind(docs, "ConfigMap")["data"]
        images = {c["image"] for d in docs if d["kind"] in ("Job", "CronJob")
                  for c in _containers(d)}
        assert data["DATA_URI"].startswith(f"gs://acme-ml-{name}-")
        assert data["OUTPUT_URI"].startswith(f"gs://acme-ml-{name}-")
        assert images == {f"europe-west4-docker.pkg.dev/acme-ml-{name}/ml-images/"
                          "image-classifier-train:COMMIT_SHA"}
        assert {d["metadata"].get("namespace") for d in docs} == {f"ml-{name}"}
        seen[name] = (data["DATA_URI"], by_kind(docs, "CronJob")["spec"]["schedule"])
    assert seen["dev"][0] != seen["prod"][0] and seen["dev"][1] != seen["prod"][1]


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]["spec"]["containers"]


def test_multiworker_job_gives_each_indexed_worker_a_stable_host_name(overlay):
    docs = overlay[1]
    job = by_kind(docs, "Job", "image-classifier-multiworker")
    service = by_kind(docs, "Service", "image-classifier-workers")
    env = {e["name"]: e for e in container(job)["env"]}
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["suspend"] is True  # deploying must not take N GPU nodes by itself
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["TFCONFIG_WORKERS"]["value"])
    assert service["spec"]["clusterIP"] == "None"
    assert pod_spec(job)["subdomain"] == service["metadata"]["name"] == env["TFCONFIG_SERVICE"]["value"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert env["TFCONFIG_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['job-name']"
    port = int(env["TFCONFIG_PORT"]["value"])
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    assert [p["containerPort"] for p in container(job)["ports"]] == [port]
    assert container(job)["command"] == ["python", "-m", "job.cluster.tfconfig", "python", "-m", "job"]


# ---- Cloud Build ------------------------------------------------------------------------------

def test_cloudbuild_matches_cloud_builds_published_schema():
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.cloudbuild",
                             str(ROOT / "cloudbuild.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloudbuild_tests_then_builds_and_pushes_both_targets_tagged_with_the_commit():
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    steps = {s["id"]: s for s in build["steps"]}
    assert "make test" in steps["unit-tests"]["args"][-1]
    targets = {}
    for step in steps.values():
        if step["name"] == "gcr.io/cloud-builders/docker" and step["args"][0] == "build":
            assert step["waitFor"] == ["unit-tests"]
            args = dict(a.split("=", 1) for a in step["args"] if a.startswith("--"))
            targets[args["--target"]] = args["--tag"]
    assert set(targets) == {"train", "edge"}
    assert sorted(build["images"]) == sorted(targets.values())
    for tag in targets.values():
        assert tag.startswith("${_")
        assert tag.endswith(":${COMMIT_SHA}")
    subs = build["substitutions"]
    assert {"_REGION", "_REPOSITORY"} <= set(subs)
    assert subs["_TRAIN_IMAGE"].startswith("${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPOSITORY}/")
    assert not re.search(r"\.json\b|keyfile|GOOGLE_APPLICATION_CREDENTIALS|secretEnv",
                         (ROOT / "cloudbuild.yaml").read_text(), re.I)


# ---- Vertex AI ---------------------------------------------------------------------------------

VERTEX_SCHEMA = json.loads((Path(__file__).parent / "vertex_customjob.schema.json").read_text())
VERTEX_SPECS = sorted((INFRA / "vertex").glob("customjob*.yaml"))
TUNING_SCHEMA = json.loads((Path(__file__).parent / "vertex_hptuningjob.schema.json").read_text())
TUNING_SPEC = INFRA / "vertex" / "hptuningjob.yaml"


@pytest.mark.parametrize("path", VERTEX_SPECS, ids=lambda p: p.name)
def test_vertex_custom_job_matches_the_documented_custom_job_spec(path):
    spec = yaml.safe_load(path.read_text())
    jsonschema.validate(spec, VERTEX_SCHEMA, cls=jsonschema.Draft202012Validator)
    assert spec["baseOutputDirectory"]["outputUriPrefix"].startswith("gs://")
    env = {e["name"] for pool in spec["workerPoolSpecs"] for e in pool["containerSpec"]["env"]}
    assert {"DATA_URI", "OUTPUT_URI", "RUN_ID"} <= env


def test_vertex_schema_rejects_an_unknown_field_and_an_unknown_accelerator():
    spec = yaml.safe_load(VERTEX_SPECS[0].read_text())
    bad_field = copy.deepcopy(spec)
    bad_field["workerPoolSpecs"][0]["containerSpec"]["imageURI"] = "x"
    bad_accelerator = copy.deepcopy(spec)
    bad_accelerator["workerPoolSpecs"][0]["machineSpec"]["acceleratorType"] = "NVIDIA_L4_GPU"
    for bad in (bad_field, bad_accelerator):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, VERTEX_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_vertex_tuning_job_matches_the_documented_tuning_job_and_custom_job_specs():
    spec = yaml.safe_load(TUNING_SPEC.read_text())
    jsonschema.validate(spec, TUNING_SCHEMA, cls=jsonschema.Draft202012Validator)
    jsonschema.validate(spec["trialJobSpec"], VERTEX_SCHEMA, cls=jsonschema.Draft202012Validator)
    assert spec["parallelTrialCount"] <= spec["maxTrialCount"]
    for parameter in spec["studySpec"]["parameters"]:
        if parameter.get("scaleType") == "UNIT_LOG_SCALE":
            assert parameter["doubleValueSpec"]["minValue"] > 0, parameter["parameterId"]


def test_vertex_tuning_schema_rejects_an_unknown_field_and_a_scaled_categorical_parameter():
    spec = yaml.safe_load(TUNING_SPEC.read_text())
    bad_field = copy.deepcopy(spec)
    bad_field["studySpec"]["metrics"][0]["metricID"] = "x"
    scaled_choice = copy.deepcopy(spec)
    (choice,) = [p for p in scaled_choice["studySpec"]["parameters"] if "categoricalValueSpec" in p]
    choice["scaleType"] = "UNIT_LINEAR_SCALE"
    for bad in (bad_field, scaled_choice):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, TUNING_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_vertex_tuning_job_tunes_job_settings_on_the_metric_the_job_reports():
    """Each parameterId is a setting's flag name, the metric is the one job/results/tuning.py
    reports for the trial's TUNING_METRIC, and the trials run the custom job's machine and image,
    with a RUN_ID (each trial's run is RUN_ID-trial-<id>) and no PROMOTE_URI."""
    import dataclasses

    from job.config import Config
    from job.results import tuning

    spec = yaml.safe_load(TUNING_SPEC.read_text())
    (pool,) = spec["trialJobSpec"]["workerPoolSpecs"]
    env = {item["name"]: item["value"] for item in pool["containerSpec"]["env"]}
    settings = {field.name for field in dataclasses.fields(Config)}
    ids = {parameter["parameterId"] for parameter in spec["studySpec"]["parameters"]}
    assert ids == {"head_learning_rate", "fine_tune_learning_rate", "fine_tune_from",
                   "augment_views"} and ids <= settings
    (metric,) = spec["studySpec"]["metrics"]
    assert metric == {"metricId": tuning.tag(env["TUNING_METRIC"]), "goal": "MAXIMIZE"}
    assert spec["studySpec"]["measurementSelectionType"] == "LAST_MEASUREMENT"
    assert env["RUN_ID"] and "PROMOTE_URI" not in env and int(env["DENSE_UNITS"]) > 0
    (custom,) = yaml.safe_load((INFRA / "vertex" / "customjob.yaml").read_text())["workerPoolSpecs"]
    assert pool["machineSpec"] == custom["machineSpec"]
    assert pool["containerSpec"]["imageUri"] == custom["containerSpec"]["imageUri"]
    Config.from_env({**env, "CLOUD_ML_TRIAL_ID": "1"})  # a trial's settings are accepted


# ---- Dockerfile ---------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style",
                             str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_says_why():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].strip().startswith("#") and "hadolint" not in lines[i - 1], \
                f"line {i + 1}: an inline ignore needs a comment line before it saying why"
    config = ROOT / ".hadolint.yaml"
    if config.exists():
        text = config.read_text().splitlines()
        for i, line in enumerate(text):
            if re.match(r"\s*-\s*(DL|SC)\d+", line):
                assert "#" in line or (i > 0 and text[i - 1].strip().startswith("#")), line


def test_images_run_as_non_root_with_the_right_entrypoints():
    stages = dockerfile_recipe.stages()
    for stage, entrypoint in (("train", ["python", "-m", "job"]), ("edge", ["python", "-m", "edge.predict"])):
        instructions = stages[stage]
        users = [a for i, a in instructions if i == "USER"]
        assert users and not users[-1].startswith(("root", "0")), stage
        (ep,) = [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"]
        assert ep == entrypoint


def test_edge_image_gets_only_the_edge_lock_and_predictor_code():
    edge = dockerfile_recipe.stages()["edge"]
    copies = [a for i, a in edge if i == "COPY"]
    assert copies == ["requirements-edge.txt /tmp/requirements/", "edge/ /app/edge/"]
    assert not {name for name in _pins(ROOT / "requirements-edge.txt") if name.startswith(("tensorflow", "keras", "tf-"))}


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_edge_lock_pins_onnxruntime_numpy_pillow_and_their_deps_as_the_runtime_lock():
    from importlib.metadata import requires

    edge, runtime = _pins(ROOT / "requirements-edge.txt"), _pins(ROOT / "requirements.txt")
    ort_deps = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower() for r in requires("onnxruntime")
                if "extra ==" not in r}
    assert {"onnxruntime", "numpy", "pillow"} | ort_deps <= set(edge)
    for name, version in edge.items():
        assert runtime.get(name) == version, name


def test_gpu_lock_adds_only_nvidia_libraries_tensorflow_asks_for():
    from importlib.metadata import requires

    wanted = {re.split(r"[ ;<>=!~]", r, maxsplit=1)[0].lower() for r in requires("tensorflow")
              if 'extra == "and-cuda"' in r}
    assert set(_pins(ROOT / "requirements-gpu.txt")) == wanted
    train = " ".join(a for i, a in dockerfile_recipe.stages()["train"] if i == "RUN")
    assert "--no-deps -r /tmp/requirements/requirements-gpu.txt" in train


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_data_environments_outputs_caches_and_git_out():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for kept_out in (".git/HEAD", ".venv/bin/python", "venv/lib/x.py", "data/cats/1.png",
                     "shared/flowers/a.jpg", "outputs/run-1/MANIFEST.json", "cache/weights.h5",
                     "job/__pycache__/config.cpython-311.pyc", ".pytest_cache/v/x", "tests/conftest.py",
                     "key.json", ".env"):
        assert _dockerignored(kept_out, patterns), kept_out
    for needed in ("Dockerfile", "requirements.txt", "requirements-gpu.txt", "requirements-edge.txt",
                   "job/config.py", "edge/images.py", "edge/predict.py", "export/pipeline.py",
                   "storage/objects.py", "common/record.py"):
        assert not _dockerignored(needed, patterns), needed


def test_dockerfile_bakes_in_no_credentials():
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"GOOGLE_APPLICATION_CREDENTIALS|\.json\b|_KEY\b|SECRET|PASSWORD|TOKEN", text, re.I)
    copied = [a for stage in dockerfile_recipe.stages().values() for i, a in stage if i in ("COPY", "ADD")]
    assert all(not a.startswith(". ") and " . " not in a for a in copied), "copy only named paths"


def test_scheduled_and_vertex_runs_promote_into_their_own_production_prefix():
    """Every run the infra starts compares itself with the production model (docs/promotion.md),
    kept apart from the runs: PROMOTE_URI never lies inside OUTPUT_URI."""
    import storage

    settings = [by_kind(render(INFRA / "overlays" / name), "ConfigMap")["data"]
                for name in OVERLAYS]
    for path in VERTEX_SPECS:
        for pool in yaml.safe_load(path.read_text())["workerPoolSpecs"]:
            settings.append({item["name"]: item["value"] for item in pool["containerSpec"]["env"]})
    for data in settings:
        assert data["PROMOTE_URI"].startswith("gs://")
        assert not storage.overlaps(data["PROMOTE_URI"], data["OUTPUT_URI"])
