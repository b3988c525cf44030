"""Scale-out on Ray Serve: ``examples/ray_serve_app.py`` on a local, loopback-only Ray instance.

Two replicas, each owning a batcher over the real MiniLM, behind Serve's HTTP proxy on
127.0.0.1. Bursts of concurrent requests go through the proxy (httpx over a real socket); each
answer is checked against an embedding computed here, one text at a time, without batchio.

What makes the checks deterministic rather than likely:

* *More than one replica*: Serve admits at most ``max_ongoing_requests`` (``ONGOING``) requests
  into a replica; a burst of ``2 * ONGOING`` concurrent requests cannot all be held by one, so
  the proxy must hand some to the other.
* *Batching in each replica*: the deployment's ``user_config`` (forwarded to
  ``Batcher.reconfigure``, which is what is under test too) sets ``max_wait=1.0``: a batch goes
  when ``max_batch_size`` rows are queued or after a second, so the rows a replica receives within
  a burst are grouped instead of racing a 5 ms timer on a loaded 2-core machine.
* The counters each answer carries are cumulative; the answer a replica computed last (the most
  batches) carries its final figures, and the rows it ran equal the requests it answered.

Ray's ``ray.init()`` advertises (and binds its gRPC servers to) the node's routable address on
Linux; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it use 127.0.0.1, which the fixture checks.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Ray reads this when it is first imported, and so does every process it starts (they inherit
# it): the node's address becomes 127.0.0.1 instead of its routable one, so the GCS, the raylet
# and the workers listen on loopback. Set before anything imports ray (the fixture checks).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import httpx
import pytest
import torch

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

pytestmark = [
    # Ray's startup, two replicas loading torch and the model on 2 cores: well past 60 s under
    # coverage on a busy machine, far below this.
    pytest.mark.timeout(300),
    # ray.serve's own config models use a pydantic-1 idiom (Field(update_type=...)); it warns
    # once, when `ray.serve` is first imported (in the fixture, so under this filter).
    pytest.mark.filterwarnings(
        r"ignore:Using extra keyword arguments on `Field` is deprecated"
        r":DeprecationWarning:ray\.serve\._private\.config"
    ),
]

DEPLOY_TIMEOUT = 180  # seconds for a deploy to be running
ONGOING = 16  # max_ongoing_requests per replica
BURST = 2 * ONGOING  # one burst: more than one replica can hold
CONFIG = {"max_batch_size": 8, "max_wait": 1.0}  # the deployment's user_config
TEXTS = [f"request {i} asks about {'the quick brown fox ' * (i % 5)}".strip() for i in range(BURST)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def deploy(port: int, user_config: dict[str, Any]) -> None:
    """Deploy the example from a config, or update it: 2 replicas, ``ONGOING`` each.

    The path ``serve run config.yaml``, ``serve deploy`` and KubeRay's RayService take: an
    application config with an import path, handed to the controller by
    ``ServeControllerClient.deploy_apps`` (what the ``serve run`` CLI calls; private in Ray 2.60,
    which is pinned). Deployed that way, a change of ``user_config`` alone keeps the code version
    and is applied to the running replicas through ``reconfigure``; ``serve.run`` of a bound app
    gives every deploy a new code version, which replaces the replicas instead. Returns once the
    application is running at the new config (``apply_config`` marks it deploying at once).
    """
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    app = {
        "name": "batchio-embed",
        "route_prefix": "/",
        "import_path": "examples.ray_serve_app:app",
        "deployments": [
            {
                "name": "Embedder",
                "num_replicas": 2,
                "max_ongoing_requests": ONGOING,
                "user_config": user_config,
            }
        ],
    }
    http = {"host": "127.0.0.1", "port": port}  # as started: the schema's default is 0.0.0.0
    config = ServeDeploySchema.model_validate({"http_options": http, "applications": [app]})
    client = serve_start(http_options=http)
    client.deploy_apps(config)
    # What deploy_apps(_blocking=True) does, with a bound that fits a loaded 2-core machine (two
    # replicas importing torch at once) instead of its fixed 60 s; a failed deploy (a bad
    # user_config) raises at once.
    client._wait_for_application_running(str(app["name"]), timeout_s=DEPLOY_TIMEOUT)
    client.wait_for_proxies_serving()


@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    """Serve's HTTP address on a local Ray instance running the example; torn down after."""
    import ray
    from ray import serve

    with pytest.MonkeyPatch.context() as env:
        # Under `--cov` (patch = subprocess) every Python child starts coverage. Ray's processes
        # inherit the raylet's environment and are killed at shutdown, not exited, so they would
        # never write their data and only run slower: start them without it.
        env.delenv("COVERAGE_PROCESS_CONFIG", raising=False)
        ray.init(
            num_cpus=2,  # one per replica (the example asks for one)
            include_dashboard=False,
            object_store_memory=100 * 1024 * 1024,  # results are small: no gigabytes of shm
            logging_level=logging.WARNING,
            namespace="batchio-test",
        )
    try:
        node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        assert node_ip == "127.0.0.1", "Ray must stay on loopback"
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(port, CONFIG)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def reference(minilm_path: Path) -> dict[str, torch.Tensor]:
    """Each text's embedding computed here, one unpadded text at a time, without batchio."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    model = AutoModel.from_pretrained(minilm_path, local_files_only=True).eval()
    out = {}
    with torch.inference_mode():
        for text in TEXTS:
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            out[text] = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
    return out


def burst(url: str, texts: list[str]) -> list[dict[str, Any]]:
    """POST every text to ``/embed`` at once (a thread each); the answers, in order."""
    with (
        httpx.Client(base_url=url, timeout=60.0) as client,
        ThreadPoolExecutor(len(texts)) as pool,
    ):
        responses = list(pool.map(lambda t: client.post("/embed", json={"text": t}), texts))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


def final_counters(answers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per replica id, the counters of the answer it computed last (the most batches and rows)."""
    last: dict[str, dict[str, Any]] = {}
    for a in answers:
        rid, counters = a["replica"]["replica_id"], a["batcher"]
        seen = last.get(rid)
        if seen is None or (counters["batches"], counters["rows"]) > (
            seen["batches"],
            seen["rows"],
        ):
            last[rid] = counters
    return last


def check_embeddings(answers: list[dict[str, Any]], reference: dict[str, torch.Tensor]) -> None:
    got = torch.tensor([a["embedding"] for a in answers])
    want = torch.stack([reference[t] for t in TEXTS])
    assert got.shape == (len(TEXTS), 384)
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def autoscaling_context(
    depths: dict[str, float] | None, queued: float = 0.0, replicas: int = 2
) -> AutoscalingContext:
    """What Serve's controller hands a policy: ``depths`` as each replica's custom metric."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from examples.ray_serve_app import QUEUE_DEPTH_METRIC

    dep = DeploymentID(name="Embedder", app_name="batchio-embed")
    running = [ReplicaID(f"r{i}", dep) for i in range(replicas)]
    metrics = None
    if depths is not None:
        metrics = {QUEUE_DEPTH_METRIC: {ReplicaID(r, dep): d for r, d in depths.items()}}
    return AutoscalingContext(
        deployment_id=dep,
        deployment_name=dep.name,
        app_name=dep.app_name,
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=running,
        total_num_requests=0.0,
        total_queued_requests=queued,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8),
    )


def test_queue_depth_policy_sizes_on_the_backlog() -> None:
    from examples.ray_serve_app import QueueDepthPolicy

    policy = QueueDepthPolicy(target_queue_rows=64)
    # 100 + 60 rows queued in the replicas, 32 requests queued in front of them: 192 / 64.
    assert policy(autoscaling_context({"r0": 100, "r1": 60}, queued=32)) == (3, {})
    assert policy(autoscaling_context({"r0": 10, "r1": 0})) == (1, {})
    assert policy(autoscaling_context({"r0": 0, "r1": 0})) == (0, {})  # Serve floors at min
    assert policy(autoscaling_context(None, replicas=3)) == (3, {})  # no report yet: hold
    with pytest.raises(ValueError, match="target_queue_rows"):
        QueueDepthPolicy(target_queue_rows=0)


def test_queue_depth_policy_is_a_valid_serve_policy_by_import_path() -> None:
    """The ``autoscaling_config`` the example's docstring and docs/scaling.md show is valid."""
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig.model_validate(
        {
            "min_replicas": 1,
            "max_replicas": 8,
            "target_ongoing_requests": 128,
            "policy": {
                "policy_function": "examples.ray_serve_app:QueueDepthPolicy",
                "policy_kwargs": {"target_queue_rows": 16},
            },
        }
    )
    # What Serve's controller does with it: load the class, build it with the kwargs, call it.
    policy = config.policy.get_policy()(**config.policy.policy_kwargs)
    assert policy(autoscaling_context({"r0": 40, "r1": 20})) == (4, {})  # 60 / 16


def test_two_replicas_each_batch_and_every_answer_is_its_own(
    serve_url: str, reference: dict[str, torch.Tensor]
) -> None:
    answers = burst(serve_url, TEXTS)

    check_embeddings(answers, reference)
    served = Counter(a["replica"]["replica_id"] for a in answers)
    assert len(served) == 2, served  # both replicas answered
    assert len({a["replica"]["pid"] for a in answers}) == 2  # ... from two processes
    counters = final_counters(answers)
    for rid, c in counters.items():
        assert (c["max_batch_size"], c["max_wait"]) == (8, 1.0)  # user_config reached it
        assert c["rows"] == served[rid]  # this replica's batcher ran exactly what it answered
        assert c["mean_batch_size"] > 1, (rid, c)  # ... in batches, not one by one
        assert c["batches"] < served[rid]


def test_user_config_reconfigures_the_running_replicas(
    serve_url: str, reference: dict[str, torch.Tensor]
) -> None:
    before = final_counters(burst(serve_url, TEXTS))

    # Only user_config changes: Serve reconfigures the running replicas instead of replacing them.
    deploy(int(serve_url.rsplit(":", 1)[1]), {"max_batch_size": 4, "max_wait": 1.0})
    answers = burst(serve_url, TEXTS)

    check_embeddings(answers, reference)
    served = Counter(a["replica"]["replica_id"] for a in answers)
    assert set(served) == set(before)  # the same replicas, reconfigured in place
    for rid, c in final_counters(answers).items():
        assert (c["max_batch_size"], c["max_wait"]) == (4, 1.0)
        rows = c["rows"] - before[rid]["rows"]
        batches = c["batches"] - before[rid]["batches"]
        assert rows == served[rid]
        assert math.ceil(rows / 4) <= batches < rows  # batches of at most 4 rows, more than 1


def test_stats_route_names_the_replica(serve_url: str) -> None:
    stats = httpx.get(f"{serve_url}/stats", timeout=30.0).json()
    assert stats["healthy"] is True
    assert stats["replica"]["pid"] != os.getpid()
    assert sum(stats["batch_size_histogram"].values()) == stats["batcher"]["batches"]


def test_replicas_report_health_and_queue_depth_through_serve(serve_url: str) -> None:
    """The hooks Serve calls (health checks, autoscaling stats), called through a handle."""
    from ray import serve

    from examples.ray_serve_app import QUEUE_DEPTH_METRIC

    handle = serve.get_app_handle("batchio-embed")
    idle = handle.record_autoscaling_stats.remote().result(timeout_s=30)
    assert idle == {QUEUE_DEPTH_METRIC: 0.0}  # nothing in flight between the tests
    assert handle.check_health.remote().result(timeout_s=30) is None
