"""Reads back the scalars that `train` logs to TensorBoard (`WORKDIR/tensorboard/events.*`).

For notebooks and reports that plot a run where TensorBoard is not installed: the event files
are TFRecord files of `Event` protos, and tensorboardX (which wrote them) ships the proto, so
no TensorFlow is needed. Record checksums are not verified; a record cut short (a file still
being written, a killed run) ends that file's reading.
"""
import glob
import os
import re
import struct

import numpy as np
from tensorboardX.proto import event_pb2

# TFRecord framing: uint64 length, uint32 CRC of the length, data, uint32 CRC of the data.
_HEADER, _FOOTER = 12, 4


def _records(path: str):
  with open(path, "rb") as f:
    while True:
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(_FOOTER)) < _FOOTER:
        return
      yield data


def _written_at(path: str) -> tuple:
  # tensorboardX names each file events.out.tfevents.<unix seconds>.<host>; a resumed run
  # writes a new file, and its points must win over the ones logged before the restart.
  match = re.search(r"tfevents\.(\d+)", os.path.basename(path))
  return (int(match.group(1)) if match else 0, os.path.getmtime(path))


def read_scalars(workdir: str) -> dict:
  """{tag: (steps int64 [N], values float64 [N])}, sorted by step, e.g. 'train/loss'.

  A step logged twice (a run resumed from a checkpoint older than its last log) keeps the
  value of the newer event file.
  """
  pattern = os.path.join(workdir, "tensorboard", "events.out.tfevents.*")
  files = sorted(glob.glob(pattern), key=_written_at)
  if not files:
    raise FileNotFoundError(f"no TensorBoard event files match {pattern}: train first "
                            f"(python -m arjax train --config=... --workdir={workdir})")
  points = {}
  for path in files:
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          points.setdefault(value.tag, {})[event.step] = value.simple_value
  return {tag: (np.array(sorted(by_step), np.int64),
                np.array([by_step[s] for s in sorted(by_step)], np.float64))
          for tag, by_step in points.items()}
