"""How the MAR sampler splits its steps into padded segments (`mar_sampling.segments`)."""
import itertools

import pytest

from arjax.families.masked import sampler as mar_sampling


def _padded_rows(schedule, bounds):
  known = schedule.num_known_before
  return sum((end - first) * int(known[end - 1]) for first, end in bounds)


@pytest.mark.parametrize("length,num_iter,buckets", [(16, 8, 3), (64, 16, 4), (64, 10, 2)])
def test_segments_cover_every_step_and_waste_the_fewest_encoder_rows(length, num_iter, buckets):
  schedule = mar_sampling.mask_schedule(length, num_iter)
  segs = mar_sampling.segments(schedule, buckets)
  known, preds = schedule.num_known_before, schedule.num_pred

  assert len(segs) <= buckets
  assert [s[0] for s in segs] == [0] + [s[1] for s in segs[:-1]] and segs[-1][1] == num_iter
  for first, end, size, slots in segs:
    assert all(known[k] <= size for k in range(first, end))  # every step's encoder fits
    assert all(preds[k] <= slots for k in range(first, end))  # every step's predictions fit
  # Brute force over every way to cut the steps into at most `buckets` segments.
  best = min(
      _padded_rows(schedule, list(zip((0,) + cuts, cuts + (num_iter,))))
      for count in range(buckets)
      for cuts in itertools.combinations(range(1, num_iter), count))
  assert _padded_rows(schedule, [(s[0], s[1]) for s in segs]) == best


def test_one_segment_per_step_pads_nothing():
  schedule = mar_sampling.mask_schedule(64, 16)
  segs = mar_sampling.segments(schedule, 16)
  assert [size for _, _, size, _ in segs] == list(schedule.num_known_before)
  assert [slots for *_, slots in segs] == list(schedule.num_pred)
