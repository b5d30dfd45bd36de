"""deploy/ validated without a container engine: the Compose file by the compose-spec parser (the Rust
``compose_spec`` crate, strict: unknown keys and wrong types are errors) plus the references it leaves
unchecked; the Helm chart rendered by Helm's own Go SDK (``helm-python-sdk``, no helm binary) with its
values and with overrides, and every manifest validated against the Kubernetes JSON schemas offline
(``kubernetes-validate``, strict: unknown fields are errors). Then what a production deployment needs:
probes on /health, a non-root user, requests and limits, a PodDisruptionBudget per role, durable topics
(three replicas, min.insync.replicas=2), the partition count passed through."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from schemas.events import ALL_TOPICS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
CHART = DEPLOY / "helm" / "medbridge"
# the oldest Kubernetes minor still supported upstream when this was written, and the newest the schemas know
KUBERNETES_VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
IMAGE_USER = 10001  # deploy/Dockerfile's useradd --uid


# Compose ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    text = COMPOSE.read_text()
    PyCompose.from_yaml(text)  # raises ValueError naming the element and line of anything off-spec
    return yaml.safe_load(text)


def test_the_compose_validator_refuses_what_the_spec_does_not_allow() -> None:
    with pytest.raises(ValueError, match="bogus"):
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    bogus: 1\n")
    with pytest.raises(ValueError, match="healthcheck"):
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    healthcheck: {test: 5}\n")


def test_compose_references_name_declared_services_and_volumes(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), (name, depends)
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in volumes, (name, mount)


def medbridge_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}


def test_compose_runs_medbridge_as_the_image_user_with_health_checks(compose: dict[str, Any]) -> None:
    services = medbridge_services(compose)
    assert {"edges", "imaging-worker", "clinical-worker", "migrate", "viewer"} <= set(services)
    for name, service in services.items():
        assert service["user"] == f"{IMAGE_USER}:{IMAGE_USER}", name
    for name in ("edges", "imaging-worker", "clinical-worker"):
        env, health = services[name]["environment"], services[name]["healthcheck"]
        assert "http://127.0.0.1:8000/health" in " ".join(health["test"]), name
        assert env["MEDBRIDGE_KAFKA_PARTITIONS"] == "${MEDBRIDGE_KAFKA_PARTITIONS:-12}", name
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["command"] == ["medbridge", "db", "upgrade"]


def test_compose_kafka_and_postgresql_are_durable(compose: dict[str, Any]) -> None:
    brokers = {n: s for n, s in compose["services"].items() if re.fullmatch(r"kafka-\d", n)}
    assert len(brokers) == 3
    for name, broker in brokers.items():
        env = broker["environment"]
        assert (env["KAFKA_DEFAULT_REPLICATION_FACTOR"], env["KAFKA_MIN_INSYNC_REPLICAS"]) == ("3", "2"), name
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false", name
    topics_command = " ".join(compose["services"]["kafka-topics"]["command"])
    assert_creates_durable_topics(topics_command, partitions="$${MEDBRIDGE_KAFKA_PARTITIONS}")
    postgres = compose["services"]["postgres"]
    assert {"fsync=on", "synchronous_commit=on", "full_page_writes=on"} <= set(postgres["command"])
    assert postgres["environment"]["POSTGRES_INITDB_ARGS"] == "--data-checksums"
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")  # no default secret


def assert_creates_durable_topics(command: str, partitions: str, replicas: str = "3", min_isr: str = "2") -> None:
    """The shell loop of a topics job creates exactly MedBridge's topics, each durable."""
    words = shlex.split(command.replace(";", " ; "))
    loop = words[words.index("in") + 1:words.index(";")]
    assert tuple(loop) == ALL_TOPICS
    args = " ".join(words)
    assert f"--partitions {partitions}" in args or f"--partitions {shlex.quote(partitions)}" in args
    assert f"--replication-factor {replicas}" in args and f"--config min.insync.replicas={min_isr}" in args


# Helm ------------------------------------------------------------------------------------------------
def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="mb", namespace="radiology")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def test_the_chart_lints_clean() -> None:
    result = helm.lint(str(CHART))
    assert result["errors"] == [] and all(m["severity"] < 2 for m in result["messages"]), result


OVERRIDES = {"kafka": {"partitions": 24}, "roles": {"imaging": {"replicas": 4}}}


# each validation reads the version's schema definitions afresh (about 0.3 s): the overrides, which change
# values only, are checked against the newest schemas alone
@pytest.mark.parametrize(("values", "versions"), [({}, KUBERNETES_VERSIONS), (OVERRIDES, KUBERNETES_VERSIONS[-1:])],
                         ids=["defaults", "overrides"])
def test_every_rendered_manifest_is_valid_kubernetes(values: dict[str, Any], versions: tuple[str, ...]) -> None:
    docs = render(values)
    assert {d["kind"] for d in docs} == {"Deployment", "PodDisruptionBudget", "Service", "Job"}
    for doc in docs:
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_the_kubernetes_validation_refuses_what_the_schema_does_not_allow() -> None:
    (deployment, *_) = [d for d in render({}) if d["kind"] == "Deployment"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment["spec"]["replicas"] = 2
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")}


@pytest.mark.parametrize("values", [{}, OVERRIDES], ids=["defaults", "overrides"])
def test_every_pod_is_probed_non_root_and_bounded(values: dict[str, Any]) -> None:
    docs = render(values)
    partitions = str(values.get("kafka", {}).get("partitions", 12))
    for name, spec in pod_specs(docs).items():
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == IMAGE_USER
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"mb-edges", "mb-imaging", "mb-clinical"}
    for d in deployments:
        (container,) = d["spec"]["template"]["spec"]["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, (d["metadata"]["name"], probe)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MEDBRIDGE_KAFKA_PARTITIONS"] == partitions
    assert next(d for d in deployments if d["metadata"]["name"] == "mb-imaging")["spec"]["replicas"] == (
        values.get("roles", {}).get("imaging", {}).get("replicas", 2))


def test_each_role_has_a_disruption_budget_selecting_its_pods() -> None:
    docs = render({})
    budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    for d in (d for d in docs if d["kind"] == "Deployment"):
        budget = budgets[d["metadata"]["name"]]
        assert budget["selector"] == d["spec"]["selector"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert budget["selector"]["matchLabels"].items() <= labels.items()
        assert budget["maxUnavailable"] == 1


def test_topics_are_created_durable_and_the_schema_upgraded_before_medbridge_starts() -> None:
    jobs = {d["metadata"]["name"]: d for d in render(OVERRIDES) if d["kind"] == "Job"}
    topics, upgrade = jobs["mb-kafka-topics"], jobs["mb-db-upgrade"]
    for job in (topics, upgrade):
        assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = topics["spec"]["template"]["spec"]["containers"]
    assert_creates_durable_topics(" ".join(container["args"]), partitions="24")
    assert upgrade["spec"]["template"]["spec"]["containers"][0]["command"] == ["medbridge", "db", "upgrade"]
