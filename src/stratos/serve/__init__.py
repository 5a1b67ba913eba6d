"""Serving the student: an OpenAI-compatible server (built-in or vLLM), load testing, cloud deployment.

- ``serve(model, spec)``: run the server in the foreground (``stratos serve``).
- ``running_server(model, ...)``: the server as a subprocess on a free port, for tests and stages.
- ``bench_serve(url, ...) -> BenchResult``: throughput and latency under concurrent clients.
- ``deploy_recipe(...)``: the SkyPilot task YAML and shell recipe for a cloud server.
"""

from stratos.serve.bench import BenchResult, bench_serve
from stratos.serve.deploy import DeployRecipe, deploy_recipe, launch, read_plan_target, validate_skypilot_yaml
from stratos.serve.server import (
    RunningServer,
    ServeError,
    choose_backend,
    free_port,
    running_server,
    serve,
    vllm_available,
    vllm_command,
)

__all__ = [
    "BenchResult", "DeployRecipe", "RunningServer", "ServeError", "bench_serve", "choose_backend", "deploy_recipe",
    "free_port", "launch", "read_plan_target", "running_server", "serve", "validate_skypilot_yaml", "vllm_available",
    "vllm_command",
]
