"""Planning a run before it starts: `evoformer inspect` (what a config is) and `evoformer plan`
(what each rank of a layout will hold). Pure computation over the config and meta-device shapes;
the model layer keeps only what it needs at run time (costs for pipeline stage balancing, in
``model.costs``)."""

from evoformer.planning.describe import describe
from evoformer.planning.memory import Plan, RankEstimate, estimate, format_plan

__all__ = ["Plan", "RankEstimate", "describe", "estimate", "format_plan"]
