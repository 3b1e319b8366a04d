"""Simulation: deterministic replay of a plan over a trace on modeled hardware."""

from sentinel_hm.sim.chrome import save_sim_chrome, sim_to_chrome
from sentinel_hm.sim.replay import Copy, SimResult, simulate

__all__ = ["Copy", "SimResult", "save_sim_chrome", "sim_to_chrome", "simulate"]
