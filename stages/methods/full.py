"""Method type `full`: fine-tune every weight of the base model, saved as a whole model."""

from __future__ import annotations

from stages.method_params import MethodParams
from stages.methods.plan import Plan
from stages.modeling import save_model
from stages.params import ModelParams


def build_model(base):
    return base  # every weight trains


def plan(section: MethodParams, base: ModelParams, seed: int) -> Plan:
    del section, base, seed  # nothing to configure: the recipe is the skeleton's
    return Plan(build=build_model, save=save_model, library="transformers", frozen_base=False)
