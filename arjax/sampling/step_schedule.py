"""Head-step annealing (DiSA): how many head steps each unit of the generation order gets.

DiSA (Zhao et al. 2025, "Diffusion Step Annealing in Autoregressive Image Generation")
observes that the head's denoising problem gets easier along the generation order: the more
tokens are known, the narrower and straighter p(x_token | z) becomes, so later tokens need
fewer head steps. A *unit* is what one head call samples: one position of the causal
family, one iteration of MAR, one entity of xAR. `config.sample`:

  head_step_schedule   'constant'  every unit takes sample.num_steps (today's sampler)
                       'linear'    sample.num_steps at unit 0 -> sample.head_steps_end at the
                                   last unit, straight in between, rounded to integers
                       'cosine'    the same ends on a half cosine: slow at both ends
                       '16,12,8,4' explicit step counts, one per unit (comma-separated in
                                   the config, like sample.labels; a tuple in code)
  head_steps_end       the last unit's steps for 'linear' / 'cosine' (ignored otherwise)

Static shapes: a schedule is host data. The samplers cut their scan over units into maximal
runs of equal step count (`runs`), each a scan whose head takes its run's count as a static
number, so one schedule is one compiled program whose segments are the distinct counts (a
50 -> 5 linear ramp: at most 46 segments, each compiled once); the constant schedule is one
run, exactly the sampler without DiSA. A bigger model with many units and a long ramp may want
an explicit tuple of a few levels, to bound compile time.
"""
import math
from typing import List, Sequence, Tuple

import numpy as np

SCHEDULES = ("constant", "linear", "cosine")


def parse(schedule):
  """The config's string ('linear', or explicit counts '16,12,8') as the samplers take it: a
  schedule name, or a tuple of ints (anything else is left for `check` to name)."""
  if isinstance(schedule, str) and schedule not in SCHEDULES:
    try:
      return tuple(int(n) for n in schedule.split(","))
    except ValueError:
      return schedule
  return schedule


def check(schedule, steps_end, num_steps=None) -> None:
  """ValueError naming the `sample.*` field that cannot describe a schedule (host-side, no
  unit count needed: the explicit tuple's length is checked by `head_steps`)."""
  schedule = parse(schedule)
  if isinstance(schedule, str):
    if schedule not in SCHEDULES:
      raise ValueError(f"sample.head_step_schedule={schedule!r}: must be one of {SCHEDULES} "
                       "or a tuple of step counts, one per unit of the generation order")
    if schedule != "constant":
      if isinstance(steps_end, bool) or not isinstance(steps_end, (int, np.integer)) \
          or steps_end <= 0:
        raise ValueError(f"sample.head_steps_end={steps_end!r}: must be an integer > 0 for "
                         f"sample.head_step_schedule={schedule!r}")
      if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
        raise ValueError(f"sample.num_steps={num_steps!r}: a {schedule!r} head-step schedule "
                         "starts from an integer step count")
    return
  if not isinstance(schedule, (tuple, list)) or not schedule:
    raise ValueError(f"sample.head_step_schedule={schedule!r}: must be one of {SCHEDULES} or "
                     "a non-empty tuple of step counts")
  for i, n in enumerate(schedule):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
      raise ValueError(f"sample.head_step_schedule[{i}]={n!r}: step counts must be integers > 0")


def head_steps(schedule, num_steps, steps_end, num_units: int) -> Tuple:
  """The step count of every unit (a tuple of `num_units` entries; the constant schedule's
  entries are `num_steps` itself, which may be a DDPM respacing string)."""
  schedule = parse(schedule)
  check(schedule, steps_end, num_steps)
  if isinstance(schedule, (tuple, list)):
    if len(schedule) != num_units:
      raise ValueError(f"sample.head_step_schedule has {len(schedule)} step counts; this "
                       f"sampler's generation order has {num_units} units (positions, "
                       "iterations or entities), one count each")
    return tuple(int(n) for n in schedule)
  if schedule == "constant":
    return (num_steps,) * num_units
  # Fraction of the way along the order: 0 at the first unit, 1 at the last.
  frac = np.arange(num_units) / max(num_units - 1, 1)
  if schedule == "cosine":
    frac = (1.0 - np.cos(math.pi * frac)) / 2.0
  counts = num_steps + (steps_end - num_steps) * frac
  # Round half up (np.round is half-to-even): 0.5 steps more is the conservative side.
  return tuple(int(math.floor(c + 0.5)) for c in counts)


def runs(steps: Sequence) -> List[Tuple[int, int, object]]:
  """[(first unit, end unit, steps)]: maximal runs of consecutive units with equal steps."""
  out = []
  for i, n in enumerate(steps):
    if out and out[-1][2] == n:
      out[-1] = (out[-1][0], i + 1, n)
    else:
      out.append((i, i + 1, n))
  return out


def split_at_runs(bounds: Sequence[Tuple[int, int]], steps: Sequence):
  """[(first, end, steps)] of each (first, end) segment of `bounds` cut further where the step
  count changes (MAR's encoder segments, each run inside one segment)."""
  out = []
  for first, end in bounds:
    for i, j, n in runs(steps[first:end]):
      out.append((first + i, first + j, n))
  return out
