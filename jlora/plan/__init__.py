"""Plan a training run before renting chips: memory per chip, fits or not, step time, a setting that fits.

    from jlora.plan import PlanRequest, plan
    result = plan(PlanRequest(model="llama-3.1-8b", topology="v5e:2x2", batch_size=8, seq_len=2048))
    result.fits, result.bytes_per_chip, result.roofline.step_seconds
"""
from jlora.plan.hardware import CHIPS
from jlora.plan.hardware import Chip
from jlora.plan.hardware import Topology
from jlora.plan.hardware import parse_topology
from jlora.plan.model import PlanError
from jlora.plan.planner import Plan
from jlora.plan.planner import PlanRequest
from jlora.plan.planner import plan
from jlora.plan.report import format_text
from jlora.plan.report import to_json
