"""The planner: server catalog, cost model, teacher probes, matching, strategy, Pareto selection.

    plan, candidates = make_plan(spec, "runs/x/plan")     # writes plan.json, plan.png, ...
    plan = Plan.from_json("runs/x/plan/plan.json")          # what the runner reads back

The pure part (``build_plan`` over ``PlanInputs``) takes numbers only; ``make_plan`` measures
them (teacher probes, optional pilot distillations) and writes the files.
"""

from stratos.plan.catalog import Server, filter_servers, load_catalog, local_server, read_catalog, shipped_catalog
from stratos.plan.costmodel import Efficiency, ModelShape, Workload
from stratos.plan.matching import Match, match
from stratos.plan.pareto import deployment_scores, pareto_front
from stratos.plan.planner import Candidate, NoFeasiblePlan, Plan, PlanInputs, build_plan
from stratos.plan.probe import TaskProfile, TeacherProbe, probe_teacher, profile_task
from stratos.plan.run import make_plan
from stratos.plan.strategy import Strategy, choose_strategy

__all__ = [
    "Candidate", "Efficiency", "Match", "ModelShape", "NoFeasiblePlan", "Plan", "PlanInputs", "Server", "Strategy",
    "TaskProfile", "TeacherProbe", "Workload", "build_plan", "choose_strategy", "deployment_scores", "filter_servers",
    "load_catalog", "local_server", "make_plan", "match", "pareto_front", "probe_teacher", "profile_task",
    "read_catalog", "shipped_catalog",
]
